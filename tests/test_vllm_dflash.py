"""A drafter trained here, served by a real engine: vLLM 0.32 (CPU build, its own venv from ``make peers``) loads
the exported DFlash checkpoint, decodes greedily exactly as without speculation and as HF, and accepts about as
many draft tokens per step as jetspec_compile drafting the same chain. The drafter is the shipped SmolLM2 one
(``$JETSPEC_VLLM_DRAFTER`` names another). ``make test-vllm``; the ``peers`` marker keeps it out of the default
suite (it starts vLLM twice, several minutes each on 2 cores)."""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.peers
def test_vllm_serves_the_exported_drafter_losslessly_and_accepts_like_our_chain(tmp_path):
    spec = importlib.util.spec_from_file_location("vllm_dflash", ROOT / "benchmarks" / "vllm_dflash.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--limit", "2", "--max-new-tokens", "48", "--json", str(tmp_path / "r.json")]
    if os.environ.get("JETSPEC_VLLM_DRAFTER"):
        args += ["--drafter", os.environ["JETSPEC_VLLM_DRAFTER"]]
    r = bench.main(args)
    assert r["hf"] == r["vllm_plain"], "vLLM without speculation differs from HF greedy decoding"
    assert r["vllm_dflash"] == r["vllm_plain"], "vLLM with the exported drafter is not lossless"
    assert r["ours_outputs"] == r["hf"]
    # a trained drafter: a random one accepts nothing (one chance in thousands per slot), and then any two engines
    # agree; this one must accept some tokens, at the same rate in both engines
    assert r["vllm_spec_counters"]["accepted_tokens"] >= 5 and r["ours_tau"] > 1.0
    assert abs(r["vllm_tau"] - r["ours_tau"]) <= 0.15 * r["ours_tau"], (r["vllm_tau"], r["ours_tau"])
