"""The speculative loop: prefill → draft → verify → accept → commit, until EOS or ``max_new_tokens``.

Small functions with shape comments; the only host syncs per step are the ones acceptance needs (the argmax /
sampled tokens of the verified nodes, one transfer per step). Statistics separate drafter time
(``draft_seconds``), target-forward time (``verify_seconds``) and the rest of the loop (``host_seconds``:
tree assembly, acceptance, KV compaction, bookkeeping).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..drafter.protocol import DraftTree
from ..tree import pad_tree
from .acceptance import accept_greedy
from .budget import BudgetController
from .sampling import accept_sampled, draw, warp_dense
from .verifier import TreeVerifier

__all__ = ["SamplingParams", "speculative_generate"]


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if self.top_k is not None and self.top_k < 0:
                raise ValueError(f"top_k must be >= 0, got {self.top_k}")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    def pick(self, logits: torch.Tensor) -> list[int]:
        """First token of each row from the prefill logits [B, V]."""
        if not self.do_sample:
            return logits.argmax(-1).tolist()
        probs = warp_dense(logits, self.temperature, self.top_k, self.top_p)
        return draw(probs, torch.rand(probs.shape[0], generator=self.generator).to(probs.device)).tolist()


def draft(drafter, roots: list[int], budget: int) -> list[DraftTree]:
    trees = drafter.draft(roots, budget)
    if len(trees) != len(roots):
        raise ValueError(f"drafter returned {len(trees)} trees for {len(roots)} rows")
    for row, (tree, root) in enumerate(zip(trees, roots)):
        if not isinstance(tree, DraftTree):
            raise TypeError(f"drafter must return DraftTree objects, row {row} got {type(tree).__name__}")
        if tree.tokens[0] != root:
            raise ValueError(f"row {row}: draft tree root token {tree.tokens[0]} is not the pending token {root}")
        if len(tree.tokens) > budget:
            raise ValueError(f"row {row}: draft tree has {len(tree.tokens)} nodes, budget is {budget}")
    return trees


def verify(verifier: TreeVerifier, trees: list[DraftTree]):
    n = max(len(t.tokens) for t in trees)
    tokens = torch.zeros(len(trees), n, dtype=torch.long, device=verifier.device)
    shapes = []
    for row, t in enumerate(trees):
        tokens[row, :len(t.tokens)] = torch.tensor(t.tokens)
        shapes.append(pad_tree(t.tree, n))
    return verifier.verify(tokens, shapes)  # logits [B, n, V], hidden [B, n, K*H]


def accept(logits: torch.Tensor, trees: list[DraftTree], params: SamplingParams) -> list[tuple[list[int], int]]:
    """Per row: (accepted node path, bonus token)."""
    if not params.do_sample:
        target = logits.argmax(-1).tolist()  # [B, n]: the one host sync of a greedy step
        return [accept_greedy(target[r], t.tree, t.tokens) for r, t in enumerate(trees)]
    return accept_sampled(logits, trees, params.temperature, params.top_k, params.top_p, params.generator)


def speculative_generate(verifier: TreeVerifier, drafter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         *, max_new_tokens: int, params: SamplingParams, eos_token_ids: Sequence[int] = (),
                         budgets: Sequence[int], emit=None) -> tuple[list[list[int]], dict]:
    """Run the loop for a left-padded batch. Returns the new tokens of every row and statistics.

    budgets: candidate tree budgets (see :class:`~jetspec_compile.runtime.budget.BudgetController`; one value
    = a fixed budget, 1 among them = may fall back to plain decoding).
    emit: optional callback ``emit(row, tokens)`` called as tokens are produced (streaming).
    """
    controller = BudgetController(budgets)
    start = time.perf_counter()
    batch = input_ids.shape[0]
    eos = set(int(e) for e in eos_token_ids)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = [max_new_tokens == 0] * batch
    stats = {"target_forwards": 0, "drafter_calls": 0, "accepted_lengths": Counter(), "steps": 0,
             "draft_seconds": 0.0, "verify_seconds": 0.0, "trace": []}
    if max_new_tokens == 0:
        return outputs, _finish(stats, outputs, start)

    def push(row: int, tokens: list[int]) -> None:
        if done[row]:
            return
        room = max_new_tokens - len(outputs[row])
        tokens = tokens[:room]
        for i, tok in enumerate(tokens):
            if tok in eos:
                tokens = tokens[:i + 1]
                done[row] = True
                break
        outputs[row].extend(tokens)
        if len(outputs[row]) >= max_new_tokens:
            done[row] = True
        if emit is not None and tokens:
            emit(row, tokens)

    logits, hidden = verifier.prefill(input_ids, attention_mask)  # [B, V], [B, P, K*H]
    stats["target_forwards"] += 1
    stats["prefill_seconds"] = time.perf_counter() - start
    real = attention_mask.bool()
    prompts = [input_ids[r][real[r]].tolist() for r in range(batch)]
    need_hidden = getattr(drafter, "needs_hidden", False)
    if callable(getattr(drafter, "set_sampling", None)):  # optional: drafters that shape trees for sampling
        drafter.set_sampling(params)
    drafter.begin(prompts, [hidden[r][real[r]] for r in range(batch)] if need_hidden else None)
    roots = params.pick(logits)
    for r in range(batch):
        push(r, [roots[r]])
    stats["trace"].append((time.perf_counter() - start, sum(len(o) for o in outputs)))
    while not all(done):
        if verifier.cache.room() < verifier.num_nodes:
            verifier.cache.defragment()
        t0 = time.perf_counter()
        budget = controller.choose()
        trees = draft(drafter, roots, budget) if budget > 1 else [DraftTree.root_only(r) for r in roots]
        t1 = time.perf_counter()
        logits, hidden = verify(verifier, trees)
        t2 = time.perf_counter()
        decisions = accept(logits, trees, params)
        paths = [[] if done[r] else path for r, (path, _) in enumerate(decisions)]  # finished rows keep nothing
        verifier.commit(paths)
        accepted = [[t.tokens[i] for i in p] for t, p in zip(trees, paths)]
        drafter.advance(accepted, [hidden[r, p] for r, p in enumerate(paths)] if need_hidden else None)
        controller.observe(budget, time.perf_counter() - t0, [p for p in paths if p])
        stats["steps"] += 1
        stats["target_forwards"] += 1
        stats["drafter_calls"] += budget > 1
        stats["draft_seconds"] += t1 - t0
        stats["verify_seconds"] += t2 - t1
        for r, (path, bonus) in enumerate(decisions):
            if not done[r]:
                stats["accepted_lengths"][len(path)] += 1
            push(r, accepted[r][1:] + [bonus])
        stats["trace"].append((time.perf_counter() - start, sum(len(o) for o in outputs)))
        roots = [bonus for _, bonus in decisions]
    stats["defragmentations"] = verifier.cache.defragmentations
    stats["budgets_used"] = dict(sorted(controller.used.items()))
    return outputs, _finish(stats, outputs, start)


def _finish(stats: dict, outputs: list[list[int]], start: float) -> dict:
    elapsed = time.perf_counter() - start
    stats["host_seconds"] = max(0.0, elapsed - stats["draft_seconds"] - stats["verify_seconds"]
                                - stats.pop("prefill_seconds", 0.0))
    hist = stats.pop("accepted_lengths")
    total_steps = sum(hist.values())
    new_tokens = sum(len(o) for o in outputs)
    stats.update(
        new_tokens=new_tokens,
        seconds=elapsed,
        tokens_per_second=new_tokens / elapsed if elapsed > 0 else 0.0,
        tau=(sum(k * v for k, v in hist.items()) / total_steps) if total_steps else 0.0,
        acceptance_histogram=dict(sorted(hist.items())),
    )
    return stats
