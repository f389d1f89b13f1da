"""The speculative loop: prefill → draft → verify → accept → commit, until EOS or ``max_new_tokens``.

Small functions with shape comments; the only host syncs per step are the ones acceptance needs (the argmax /
sampled tokens of the verified nodes, one transfer per step), plus, on CPU only, the certified LM head's own
(``kernels/lm_head.py``: a finiteness check and the candidate search). Statistics separate drafter time
(``draft_seconds``), target-forward time (``verify_seconds``) and the rest of the loop (``host_seconds``:
tree assembly, acceptance, KV compaction, bookkeeping).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..drafter.protocol import DraftTree
from ..tree import pad_tree
from .acceptance import accept_greedy
from .budget import BudgetController
from .sampling import accept_sampled, draw, warp_dense
from .verifier import TreeVerifier

__all__ = ["SamplingParams", "LoopStats", "LoopState", "speculative_generate"]


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


def verify(verifier: TreeVerifier, trees: list[DraftTree], params: SamplingParams):
    """Greedy: ``(target [B, n] argmax tokens, hidden)``; sampling: ``(logits [B, n, V], hidden [B, n, K*H])``."""
    n = max(len(t.tokens) for t in trees)
    tokens = torch.zeros(len(trees), n, dtype=torch.long, device=verifier.device)
    shapes = []
    for row, t in enumerate(trees):
        tokens[row, :len(t.tokens)] = torch.tensor(t.tokens)
        shapes.append(pad_tree(t.tree, n))
    return verifier.verify(tokens, shapes) if params.do_sample else verifier.verify_greedy(tokens, shapes)


def accept(out: torch.Tensor, trees: list[DraftTree], params: SamplingParams) -> list[tuple[list[int], int]]:
    """Per row: (accepted node path, bonus token), from what :func:`verify` returned."""
    if not params.do_sample:
        target = out.tolist()  # [B, n]: the one host sync of a greedy step
        return [accept_greedy(target[r], t.tree, t.tokens) for r, t in enumerate(trees)]
    return accept_sampled(out, trees, params.temperature, params.top_k, params.top_p, params.generator)


@dataclass(eq=False)
class LoopStats(Mapping):
    """Statistics of one speculative loop (what ``SpecModel.last_stats`` holds). Fields read as attributes or,
    like a dict, by name (``stats["tau"]``).

    Attributes:
        steps, target_forwards, drafter_calls: loop steps; target forwards (prefill included); drafter calls.
        prefill_seconds, draft_seconds, verify_seconds, host_seconds, seconds: where the time went (host: tree
            assembly, acceptance, KV compaction, bookkeeping), and the whole loop.
        new_tokens, tokens_per_second: tokens generated (all rows) and their rate.
        tau: mean tokens committed per verification step (accepted drafts + the bonus token).
        acceptance_histogram: ``{accepted path length: steps}`` (the root counts: 1 = nothing drafted accepted).
        budgets_used: ``{budget: steps}`` as the budget controller chose.
        defragmentations: KV-cache compactions; trace: ``(seconds, tokens emitted)`` after every step.

    A read-only mapping of these names too (``stats["tau"]``, ``stats.get(...)``, ``dict(stats)``).
        batch_size: rows of the loop (more than a call's own when calls were batched together).
    """

    steps: int = 0
    target_forwards: int = 0
    drafter_calls: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    host_seconds: float = 0.0
    seconds: float = 0.0
    new_tokens: int = 0
    tokens_per_second: float = 0.0
    tau: float = 0.0
    acceptance_histogram: dict[int, int] = field(default_factory=dict)
    budgets_used: dict[int, int] = field(default_factory=dict)
    defragmentations: int = 0
    trace: list[tuple[float, int]] = field(default_factory=list)
    batch_size: int = 1

    def __getitem__(self, name: str):
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self):
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)

    def finish(self, start: float, accepted_lengths: Counter, new_tokens: int) -> "LoopStats":
        self.seconds = time.perf_counter() - start
        self.host_seconds = max(0.0, self.seconds - self.draft_seconds - self.verify_seconds - self.prefill_seconds)
        steps = sum(accepted_lengths.values())
        self.new_tokens = new_tokens
        self.tokens_per_second = new_tokens / self.seconds if self.seconds > 0 else 0.0
        self.tau = sum(k * v for k, v in accepted_lengths.items()) / steps if steps else 0.0
        self.acceptance_histogram = dict(sorted(accepted_lengths.items()))
        return self


@dataclass
class LoopState:
    """The batch's progress through the loop, one entry per row."""

    max_new_tokens: int
    eos: frozenset[int]
    outputs: list[list[int]]  # [B] tokens emitted so far
    done: list[bool]  # [B] the row hit EOS or max_new_tokens
    emit: Callable[[int, list[int]], None] | None = None

    @classmethod
    def start(cls, batch: int, max_new_tokens: int, eos: Sequence[int], emit=None) -> "LoopState":
        return cls(max_new_tokens, frozenset(int(e) for e in eos), [[] for _ in range(batch)],
                   [max_new_tokens == 0] * batch, emit)

    @property
    def finished(self) -> bool:
        return all(self.done)

    @property
    def emitted(self) -> int:
        return sum(len(o) for o in self.outputs)

    def push(self, row: int, tokens: list[int]) -> None:
        """Emit ``tokens`` for ``row``, cut at its first EOS and at ``max_new_tokens``."""
        if self.done[row]:
            return
        tokens = tokens[:self.max_new_tokens - len(self.outputs[row])]
        for i, tok in enumerate(tokens):
            if tok in self.eos:
                tokens = tokens[:i + 1]
                self.done[row] = True
                break
        self.outputs[row].extend(tokens)
        if len(self.outputs[row]) >= self.max_new_tokens:
            self.done[row] = True
        if self.emit is not None and tokens:
            self.emit(row, tokens)


def speculative_generate(verifier: TreeVerifier, drafter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         *, max_new_tokens: int, params: SamplingParams, eos_token_ids: Sequence[int] = (),
                         budgets: Sequence[int], emit=None) -> tuple[list[list[int]], LoopStats]:
    """Run the loop for a left-padded batch. Returns the new tokens of every row and the loop's statistics.

    budgets: candidate tree budgets (see :class:`~jetspec_compile.runtime.budget.BudgetController`; one value
    = a fixed budget, 1 among them = may fall back to plain decoding).
    emit: optional callback ``emit(row, tokens)`` called as tokens are produced (streaming).
    """
    controller = BudgetController(budgets)
    start = time.perf_counter()
    batch = input_ids.shape[0]
    state = LoopState.start(batch, max_new_tokens, eos_token_ids, emit)
    stats, accepted_lengths = LoopStats(batch_size=batch), Counter()
    if state.finished:
        return state.outputs, stats.finish(start, accepted_lengths, 0)

    logits, hidden = verifier.prefill(input_ids, attention_mask)  # [B, V], [B, P, K*H]
    stats.target_forwards += 1
    stats.prefill_seconds = time.perf_counter() - start
    real = attention_mask.bool()
    prompts = [input_ids[r][real[r]].tolist() for r in range(batch)]
    need_hidden = getattr(drafter, "needs_hidden", False)
    if callable(getattr(drafter, "set_sampling", None)):  # optional: drafters that shape trees for sampling
        drafter.set_sampling(params)
    drafter.begin(prompts, [hidden[r][real[r]] for r in range(batch)] if need_hidden else None)
    roots = params.pick(logits)  # [B] the pending token of every row
    for r in range(batch):
        state.push(r, [roots[r]])
    stats.trace.append((time.perf_counter() - start, state.emitted))
    while not state.finished:
        verifier.make_room()
        t0 = time.perf_counter()
        budget = controller.choose()
        trees = draft(drafter, roots, budget) if budget > 1 else [DraftTree.root_only(r) for r in roots]
        t1 = time.perf_counter()
        out, hidden = verify(verifier, trees, params)  # [B, n] tokens or [B, n, V] logits, [B, n, K*H]
        t2 = time.perf_counter()
        decisions = accept(out, trees, params)
        paths = [[] if state.done[r] else path for r, (path, _) in enumerate(decisions)]  # finished rows keep nothing
        verifier.commit(paths)
        accepted = [[t.tokens[i] for i in p] for t, p in zip(trees, paths)]
        drafter.advance(accepted, [hidden[r, p] for r, p in enumerate(paths)] if need_hidden else None)
        controller.observe(budget, time.perf_counter() - t0, [p for p in paths if p])
        stats.steps += 1
        stats.target_forwards += 1
        stats.drafter_calls += budget > 1
        stats.draft_seconds += t1 - t0
        stats.verify_seconds += t2 - t1
        for r, (path, bonus) in enumerate(decisions):
            if not state.done[r]:
                accepted_lengths[len(path)] += 1
            state.push(r, accepted[r][1:] + [bonus])
        stats.trace.append((time.perf_counter() - start, state.emitted))
        roots = [bonus for _, bonus in decisions]
    stats.defragmentations = verifier.defragmentations
    stats.budgets_used = dict(sorted(controller.used.items()))
    return state.outputs, stats.finish(start, accepted_lengths, state.emitted)
