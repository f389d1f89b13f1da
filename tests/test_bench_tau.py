"""bench_tau's paired comparison of two drafters over the same prompts (no model run)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_tau():
    spec = importlib.util.spec_from_file_location("bench_tau", ROOT / "benchmarks" / "bench_tau.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_identical_drafters_differ_by_nothing(bench_tau):
    counts = [[40, 20], [90, 30], [25, 25], [60, 15]]
    assert bench_tau.paired_bootstrap_tau(counts, counts) == (0.0, 0.0, 0.0)


def test_the_difference_is_of_pooled_tau_and_a_consistent_gain_excludes_zero(bench_tau):
    base = [[40, 20], [90, 30], [25, 25], [60, 15], [70, 35], [33, 11]]
    better = [[t + s // 2, s] for t, s in base]  # half a token more per step on every prompt
    diff, low, high = bench_tau.paired_bootstrap_tau(base, better)
    pooled = lambda xs: sum(t for t, _ in xs) / sum(s for _, s in xs)  # noqa: E731
    assert diff == pytest.approx(pooled(better) - pooled(base))
    assert 0 < low <= diff <= high


def test_a_gain_on_one_prompt_only_is_not_told_apart_from_noise(bench_tau):
    base = [[40, 20], [90, 30], [25, 25], [60, 15], [70, 35], [33, 11]]
    mixed = [[t + (s if i == 0 else -s // 5), s] for i, (t, s) in enumerate(base)]  # one up a lot, the rest down
    diff, low, high = bench_tau.paired_bootstrap_tau(base, mixed)
    assert low < 0 < high and low <= diff <= high


def test_prompts_must_pair_up(bench_tau):
    with pytest.raises(ValueError, match="same non-empty prompts"):
        bench_tau.paired_bootstrap_tau([[1, 1]], [[1, 1], [2, 1]])
    with pytest.raises(ValueError, match="at least one step"):
        bench_tau.paired_bootstrap_tau([[1, 0]], [[1, 1]])
