"""Acceptance rules: which path of a verified tree to keep, and the bonus token after it.

All three are lossless:

* :func:`accept_greedy` — follow the child whose token is the target's argmax; the argmax at the deepest
  accepted node is the bonus token. Output equals plain greedy decoding.
* :func:`accept_sample_follow` — sample the target at each node and follow a child with that token (any
  tree, no draft probabilities needed): every emitted token is a plain sample of the target.
* :func:`accept_rejection` — multi-branch recursive rejection sampling without replacement (SpecInfer /
  Recursive Speculative Decoding): children drawn from ``q`` without replacement are tried in order; child
  ``x`` is accepted with probability ``min(1, p(x) / q(x))``, otherwise ``p`` becomes ``norm(max(p - q, 0))``
  and ``x`` is removed from ``q``; if all fail the bonus token is drawn from the residual.

Distributions are the target's after :func:`warp_logits` (temperature, top-k, top-p, as HF ``generate``).
"""

from __future__ import annotations

import torch

from ..tree import TreeSpec

__all__ = ["warp_logits", "accept_greedy", "accept_sample_follow", "accept_rejection", "children_of"]


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """Probabilities from ``logits [..., V]`` after temperature, top-k and top-p, in HF ``generate``'s order."""
    scores = logits.float() / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # keep at least one token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(-1)


def children_of(tree: TreeSpec) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in range(len(tree))]
    for child, parent in enumerate(tree.parents):
        if parent >= 0:
            kids[parent].append(child)
    return kids


def accept_greedy(target: list[int], tree: TreeSpec, tokens: tuple[int, ...]) -> tuple[list[int], int]:
    """target: the argmax token at every node. Returns ``(accepted path of node indices, bonus token)``."""
    kids = children_of(tree)
    node, path = 0, [0]
    while True:
        want = target[node]
        nxt = next((c for c in kids[node] if tokens[c] == want), None)
        if nxt is None:
            return path, want
        node = nxt
        path.append(node)


def _sample(p: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(p, 1, generator=generator))


def accept_sample_follow(probs: torch.Tensor, tree: TreeSpec, tokens: tuple[int, ...],
                         generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """probs: [n, V] warped target distribution at every node."""
    kids = children_of(tree)
    node, path = 0, [0]
    while True:
        x = _sample(probs[node], generator)
        nxt = next((c for c in kids[node] if tokens[c] == x), None)
        if nxt is None:
            return path, x
        node = nxt
        path.append(node)


def accept_rejection(probs: torch.Tensor, draft_probs: torch.Tensor, tree: TreeSpec, tokens: tuple[int, ...],
                     generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """probs: [n, V] warped target distributions; draft_probs: [n, V] the distributions children were drawn from."""
    kids = children_of(tree)
    node, path = 0, [0]
    while True:
        p = probs[node].clone()
        q = draft_probs[node].float().clone()
        accepted = None
        for child in kids[node]:
            x = tokens[child]
            qx = float(q[x])
            if qx <= 0.0:
                raise ValueError(f"draft probability of child token {x} at node {node} is 0; probs must be the "
                                 "distribution the children were drawn from")
            u = float(torch.rand((), generator=generator))
            if u * qx < float(p[x]):
                accepted = child
                break
            p = torch.clamp(p - q, min=0.0)
            total = p.sum()
            q[x] = 0.0
            q = q / q.sum() if q.sum() > 0 else q
            if total <= 0:  # p was covered by q entirely; cannot happen for a proper q, guard anyway
                p = probs[node].clone()
                p[x] = 0.0
                total = p.sum()
            p = p / total
        if accepted is None:
            return path, _sample(p, generator)
        node = accepted
        path.append(node)
