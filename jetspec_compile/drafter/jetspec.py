"""JetSpecDrafter: the parallel drafter behind the drafter protocol.

Per row it keeps the injected context keys/values of every committed token (computed from the target's
tapped hidden states as they arrive, so the target is never run again for the drafter). Each ``draft`` is one
drafter forward over ``[root, MASK × D]`` and a best-first tree over its per-depth distributions.
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
    """

    needs_hidden = True

    def __init__(self, model: ParallelDrafter, width: int = 4, max_depth: int | None = None):
        self.model = model.eval()
        self.width = width
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
    def depth_logprobs(self, row: int, root: int) -> torch.Tensor:
        """Draft log-probabilities ``[D, V]`` of depths 1..D after the row's context and ``root``."""
        cfg = self.model.cfg
        p = self._length[row]
        s = cfg.block_size
        device = self.model.fc.weight.device
        positions = torch.arange(p, p + s, device=device)[None]
        mask = torch.zeros(1, 1, s, p + s, device=device)
        mask[..., p:] = torch.full((s, s), float("-inf"), device=device).triu(1)
        logits = self.model(torch.tensor([[root]], device=device), positions, self._ctx[row], mask)
        return logits[0, 0, :self.max_depth].float().log_softmax(-1)

    def draft(self, roots: Sequence[int], budget: int) -> list[DraftTree]:
        out = []
        for row, root in enumerate(roots):
            tokens, tree = best_first_tree(int(root), self.depth_logprobs(row, int(root)), budget, self.width)
            out.append(DraftTree(tokens, tree))
        return out
