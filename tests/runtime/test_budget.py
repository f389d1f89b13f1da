import pytest

from jetspec_compile.config import JetSpecConfig
from jetspec_compile.runtime.budget import BudgetController


def run(controller, steps, cost, paths_for):
    for _ in range(steps):
        b = controller.choose()
        controller.observe(b, cost(b), paths_for(b))
    return controller


def test_falls_back_to_plain_decoding_when_drafts_are_rejected():
    c = run(BudgetController((1, 16)), 40, cost=lambda b: 0.05 + 0.01 * b, paths_for=lambda b: [[0]])
    assert c.used[1] > c.used[16]  # only the first step and the probes speculate
    assert c.used[16] <= 1 + 40 // c.probe_every


def test_keeps_speculating_when_it_pays_and_picks_the_best_budget():
    # best-first trees: acceptance grows slowly past 8 nodes while cost keeps growing
    def paths_for(b):
        return [[0, 1, 2, 3, 5][: (5 if b >= 8 else 3 if b >= 4 else 1)]]

    c = run(BudgetController((1, 4, 8, 32)), 60, cost=lambda b: 0.05 + 0.004 * b, paths_for=paths_for)
    assert c.used.most_common(1)[0][0] == 8
    assert c.tau[8] > c.tau[4] > 1.0


def test_config_budgets():
    assert JetSpecConfig(budget=8).budgets == (1, 8)
    assert JetSpecConfig(budget=8, fallback=False).budgets == (8,)
    assert JetSpecConfig(budget="auto").budgets == (1, 4, 8, 16, 32)
    assert JetSpecConfig(budget="auto").max_budget == 32


def test_probes_climb_one_budget_at_a_time():
    """While budget 8 wins, probes go to 16 (the next larger), not to the expensive 32."""
    def paths_for(b):
        return [[0, 1, 2, 3, 5][: (5 if b >= 8 else 3 if b >= 4 else 1)]]

    c = run(BudgetController((1, 4, 8, 16, 32)), 80, cost=lambda b: 0.05 + 0.004 * b, paths_for=paths_for)
    assert c.used.most_common(1)[0][0] == 8
    assert c.used[16] >= 80 // (c.probe_every + 1) - 2  # probed regularly (a probe loses 0.39 steps of budget 8)
    assert c.used[32] <= 2  # the first step (largest first), maybe one climb


def _throughput(controller, steps, cost, accepted):
    """Tokens per second of a run: a step at budget b takes cost(b) and commits accepted(b) tokens."""
    tokens = seconds = 0.0
    for _ in range(steps):
        b = controller.choose()
        n = accepted(b)
        controller.observe(b, cost(b), [list(range(n))])
        tokens, seconds = tokens + n, seconds + cost(b)
    return tokens / seconds


def test_dear_probes_are_rare_and_cheap_probes_are_not():
    """A batch of 16 rows on a CPU: a budget-8 step costs 5.6 plain steps for 1.4 tokens a row. Probing it every
    4 steps lost ~40% against plain decoding; spaced by the square of what they lose, probes lose ~5%. Where a
    probe loses less than a plain step (batch 1), probes still come every probe_every steps."""
    dear = {1: 0.065, 8: 0.365}
    c = BudgetController((1, 8))
    rate = _throughput(c, 400, dear.__getitem__, lambda b: 1 if b == 1 else 2 if c.used[8] % 5 < 2 else 1)
    assert rate >= 0.92 / dear[1]  # within 8% of decoding plainly throughout
    assert c.used[8] <= 1 + 400 // 40
    cheap = BudgetController((1, 8))  # a budget-8 step of 1.2 plain ones that returns 1 token: loses 0.2 steps
    _throughput(cheap, 400, {1: 0.030, 8: 0.036}.__getitem__, lambda b: 1)
    assert cheap.used[8] >= 400 // (cheap.probe_every + 1) - 2
    with pytest.raises(ValueError, match="probe_every"):
        BudgetController((1, 8), probe_every=0)
