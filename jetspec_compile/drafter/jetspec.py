"""JetSpecDrafter: the parallel drafter behind the drafter protocol.

Per row it keeps the injected context keys/values of every committed token (computed from the target's
tapped hidden states as they arrive, so the target is never run again for the drafter). Each ``draft`` is one
drafter forward over ``[root, MASK × D]`` and a best-first tree over its per-depth distributions. With
``path_branches=k`` a second forward re-drafts depths 2.. for the k best depth-1 tokens, each block
``[root, token, MASK × (D-1)]`` (all k in one batch), so those subtrees follow their own path instead of the
shared per-depth marginals (needs a drafter trained with ``reveal_prob > 0``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .model import ParallelDrafter
from .protocol import DraftTree
from .tree_builder import best_first_tree

__all__ = ["JetSpecDrafter"]


class JetSpecDrafter:
    """Drafter-protocol wrapper of a :class:`ParallelDrafter`.

    Args:
        model: the trained drafter network.
        width: candidates per depth (W) in the best-first tree; 1 gives a chain.
        max_depth: cap on tree depth (default: the drafter's block depth D).
        path_branches: depth-1 candidates whose subtrees are re-drafted conditioned on them (0 = off).
    """

    needs_hidden = True

    def __init__(self, model: ParallelDrafter, width: int = 4, max_depth: int | None = None,
                 path_branches: int = 0):
        if path_branches < 0:
            raise ValueError(f"path_branches must be >= 0, got {path_branches}")
        self.model = model.eval()
        self.width = width
        self.path_branches = path_branches
        self.max_depth = min(max_depth or model.cfg.depth, model.cfg.depth)
        cfg = model.cfg
        self.vocab_size = cfg.vocab_size
        self.target_hidden_size = cfg.target_hidden_size
        self.tap_layers = cfg.tap_layers
        self._ctx: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self._length: list[int] = []

    @torch.no_grad()
    def _append(self, row: int, hidden: torch.Tensor) -> None:
        t = hidden.shape[0]
        if t == 0:
            return
        start = self._length[row]
        positions = torch.arange(start, start + t, device=hidden.device)[None]
        new = self.model.context_kv(hidden[None], positions)
        old = self._ctx[row]
        self._ctx[row] = new if not old else [(torch.cat([ok, nk], 2), torch.cat([ov, nv], 2))
                                              for (ok, ov), (nk, nv) in zip(old, new)]
        self._length[row] = start + t

    def begin(self, prompts, hidden) -> None:
        if hidden is None:
            raise ValueError("JetSpecDrafter needs the target's tapped hidden states")
        self._ctx = [[] for _ in prompts]
        self._length = [0] * len(prompts)
        for row, h in enumerate(hidden):
            self._append(row, h)

    def advance(self, accepted, hidden) -> None:
        for row, h in enumerate(hidden):
            self._append(row, h)

    @torch.no_grad()
    def _block_logprobs(self, row: int, root: int, given: Sequence[int | None]) -> torch.Tensor:
        """One drafter forward over ``len(given)`` blocks ``[root, g, MASK...]`` (``g=None``: all MASK) after the
        row's context; returns log-probabilities ``[M, S, V]`` (index i = depth i + 1)."""
        cfg = self.model.cfg
        p, s, m = self._length[row], cfg.block_size, len(given)
        device = self.model.fc.weight.device
        positions = torch.arange(p, p + s, device=device).repeat(m)[None]
        causal = torch.full((s, s), float("-inf"), device=device).triu(1)
        mask = torch.zeros(1, 1, m * s, p + m * s, device=device)
        mask[..., p:] = float("-inf")
        for j in range(m):  # each block sees the context and its own causal prefix
            mask[..., j * s:(j + 1) * s, p + j * s:p + (j + 1) * s] = causal
        revealed = None
        if any(g is not None for g in given):
            revealed = torch.full((1, m, s - 1), -1, dtype=torch.long, device=device)
            for j, g in enumerate(given):
                if g is not None:
                    revealed[0, j, 0] = g
        anchors = torch.full((1, m), root, dtype=torch.long, device=device)
        logits = self.model(anchors, positions, self._ctx[row], mask, revealed)
        return logits[0].float().log_softmax(-1)

    def depth_logprobs(self, row: int, root: int) -> torch.Tensor:
        """Draft log-probabilities ``[D, V]`` of depths 1..D after the row's context and ``root``."""
        return self._block_logprobs(row, root, [None])[0, :self.max_depth]

    def draft(self, roots: Sequence[int], budget: int) -> list[DraftTree]:
        out = []
        for row, root in enumerate(roots):
            root = int(root)
            logprobs = self.depth_logprobs(row, root)
            branches = None
            k = min(self.path_branches, self.width, budget - 1)
            if k > 0 and self.max_depth > 1:
                firsts = logprobs[0].topk(k).indices.tolist()
                again = self._block_logprobs(row, root, firsts)  # [k, S, V]
                branches = {rank: again[rank, 1:self.max_depth] for rank in range(k)}
            tokens, tree = best_first_tree(root, logprobs, budget, self.width, branches)
            out.append(DraftTree(tokens, tree))
        return out
