"""Choosing the tree budget each step, and falling back to plain decoding when speculation does not pay.

Verifying ``b`` nodes costs ``t_b`` seconds (cheap on a GPU, far from free on a 2-core CPU) and commits ``τ_b``
tokens on average; the controller runs the budget with the best ``τ_b / t_b``. Budget 1 is plain decoding
(``τ_1 = 1``), so "speculation would not pay" is simply budget 1 winning.

``τ_b`` for every ``b`` up to the budget actually used comes for free from each step: draft trees list their
nodes best-first (parents before children, most likely first), so the tree a smaller budget would have drafted
is the first ``b`` nodes of the larger one, and the path it would have accepted is the part of the accepted path
inside those nodes. ``t_b`` is measured whenever budget ``b`` runs (exponential moving averages). From time to
time the next budget above the current best is probed (one step there also refreshes ``τ`` of every smaller
budget), so the estimates follow the text; the controller climbs one budget at a time instead of paying for the
largest tree on every probe (on a CPU a large tree's verify costs several decoding steps).

How often: a probe step loses ``loss = t_L / t_best − τ_L / τ_best`` steps of the best budget's time (what it
costs, less what its tokens would have cost there). A probe that loses less than one step is cheap exploration
(the text changes, and speculation may pay again): it comes every ``probe_every`` steps. A dearer one comes every
``probe_every · loss²`` steps, so the share of the time it may lose falls as ``1 / (probe_every · loss)``. At batch
1 on a CPU a budget-8 step costs ~1.2 plain ones and probes stay every 4 steps; at batch 16 (eager) it costs ~5.6
plain ones for ~1.4 tokens a row (loss ~4.2) and probes come every ~70 steps, where probing every 4 steps lost 38% of
the throughput (docs/results.md, batches). The output is unaffected: every budget is lossless.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["BudgetController"]


class BudgetController:
    """Per-generation budget choice.

    Args:
        budgets: candidate budgets (1 = plain decoding); a single budget disables adaptation.
        decay: EMA decay of the τ and cost estimates.
        probe_every: steps between probes of the next larger budget than the winning one, where a probe loses
            less than one step of the winner (dearer probes are spaced further, see above).
    """

    def __init__(self, budgets, decay: float = 0.8, probe_every: int = 4):
        if probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {probe_every}")
        self.budgets = tuple(sorted(set(budgets)))
        self.decay, self.probe_every = decay, probe_every
        self.tau: dict[int, float | None] = {b: (1.0 if b == 1 else None) for b in self.budgets}
        self.cost: dict[int, float | None] = {b: None for b in self.budgets}
        self.since_probe = 0
        self._best = self.largest
        self.used = Counter()

    @property
    def largest(self) -> int:
        return self.budgets[-1]

    def choose(self) -> int:
        if len(self.budgets) == 1:
            return self.largest
        if self.tau[self.largest] is None:  # the largest first: it yields τ for every smaller budget
            return self.largest
        unknown = [b for b in self.budgets if self.cost[b] is None]
        if unknown:
            return unknown[0]
        best = self._best = max(self.budgets, key=lambda b: self.tau[b] / self.cost[b])
        larger = [b for b in self.budgets if b > best]
        if larger and self.since_probe >= self.probe_interval(best, larger[0]):
            return larger[0]
        return best

    def probe_interval(self, best: int, probe: int) -> float:
        """Steps of ``best`` between probes of ``probe``: ``probe_every · max(1, loss)²`` (module docstring)."""
        loss = self.cost[probe] / self.cost[best] - self.tau[probe] / self.tau[best]
        return self.probe_every * max(1.0, loss) ** 2

    def observe(self, used: int, seconds: float, paths) -> None:
        """Record one step: the budget used, its wall time, and each active row's accepted node path."""
        self.used[used] += 1
        self.since_probe = 0 if used > self._best or used == self.largest else self.since_probe + 1
        old = self.cost[used]
        self.cost[used] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds
        if not paths:
            return
        for b in self.budgets:
            if b > used or b == 1:
                continue
            tau = sum(sum(1 for node in p if node < b) for p in paths) / len(paths)
            self.tau[b] = tau if self.tau[b] is None else self.decay * self.tau[b] + (1 - self.decay) * tau
