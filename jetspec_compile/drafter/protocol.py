"""The drafter protocol: how any drafter plugs into the speculative runtime.

A drafter proposes one :class:`DraftTree` per batch row per step. The runtime calls, in order::

    drafter.begin(prompts, hidden)          once after prefill
    drafter.draft(roots, budget) -> trees   every step
    drafter.advance(accepted, hidden)       after every verification

* ``prompts``: per row, the prompt token ids (padding removed).
* ``hidden``: per row, the target's tapped hidden states ``[T, K*H]`` of those tokens (the layers the verifier
  taps; ``None`` for drafters that declare ``needs_hidden = False``).
* ``roots``: per row, the pending token (emitted, not yet verified): it must be node 0 of the row's tree.
* ``accepted``: per row, the tokens just committed (the root and the accepted drafted tokens, in order), and
  ``hidden`` their tapped hidden states. The next ``draft`` gets the bonus token as its root.

A drafter may give ``probs`` with its tree: ``probs[i]`` is the distribution that node ``i``'s children were
drawn from *without replacement, in child order*. Then sampling uses multi-branch recursive rejection sampling
(more tokens accepted); without ``probs`` it samples the target at each node and follows a matching child.
Both are lossless. Greedy decoding never needs ``probs``. A drafter may define ``set_sampling(params)``: the
runtime calls it before ``begin`` with its ``SamplingParams`` (temperature, top-k, top-p, generator), so the
drafter can draw children from its own distribution warped like the target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

from ..tree import TreeSpec

__all__ = ["DraftTree", "Drafter"]


@dataclass(frozen=True)
class DraftTree:
    """One row's proposal: node tokens (node 0 = root), the tree shape, optional per-node child distributions.

    Args:
        tokens: token id of every node, ``len(tokens) == len(tree)``.
        tree: the shape (parents before children).
        probs: optional ``[n, V]`` float tensor, see the module docstring.
    """

    tokens: tuple[int, ...]
    tree: TreeSpec
    probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        if len(self.tokens) != len(self.tree):
            raise ValueError(f"DraftTree has {len(self.tokens)} tokens for a tree of {len(self.tree)} nodes")
        seen = set()
        for child, parent in enumerate(self.tree.parents):
            if parent >= 0:
                key = (parent, self.tokens[child])
                if key in seen:
                    raise ValueError(f"node {parent} has two children with token {self.tokens[child]}; "
                                     "sibling tokens must be distinct")
                seen.add(key)
        if self.probs is not None and (self.probs.dim() != 2 or self.probs.shape[0] != len(self.tokens)):
            raise ValueError(f"probs must be [n={len(self.tokens)}, V], got {tuple(self.probs.shape)}")

    @classmethod
    def root_only(cls, root: int) -> "DraftTree":
        return cls((root,), TreeSpec((-1,)))


@runtime_checkable
class Drafter(Protocol):
    """What the runtime needs from a drafter (see the module docstring for the call order)."""

    #: whether ``begin``/``advance`` need the target's tapped hidden states
    needs_hidden: bool

    def begin(self, prompts: Sequence[Sequence[int]], hidden: Sequence[torch.Tensor] | None) -> None: ...

    def draft(self, roots: Sequence[int], budget: int) -> list[DraftTree]: ...

    def advance(self, accepted: Sequence[Sequence[int]], hidden: Sequence[torch.Tensor] | None) -> None: ...
