"""Best-first draft-tree construction from per-depth draft distributions.

Given ``logprobs [D, V]`` (one distribution per depth from one drafter forward), nodes are named by the ranks of
their tokens at each depth; a node's score is the sum of its path's log-probabilities. A heap pops the best
candidate, adds it, and pushes its first child and its next sibling, until ``budget`` nodes (root included)
exist. Every parent at depth ``d`` draws its children from the same top-``width`` tokens of depth ``d + 1``
(per-depth marginals, as in the JetSpec reference code). Parents always precede their children.
"""

from __future__ import annotations

import heapq

import torch

from ..tree import TreeSpec

__all__ = ["best_first_tree"]


def best_first_tree(root: int, logprobs: torch.Tensor, budget: int, width: int) -> tuple[tuple[int, ...], TreeSpec]:
    """Return ``(tokens, tree)`` with at most ``budget`` nodes; node 0 is ``root``."""
    depth = logprobs.shape[0]
    if budget < 1 or width < 1:
        raise ValueError(f"budget and width must be >= 1, got {budget} and {width}")
    width = min(width, logprobs.shape[1])
    top_v, top_i = logprobs.float().topk(width, dim=-1)  # [D, W]
    top_v, top_i = top_v.tolist(), top_i.tolist()
    tokens, parents = [root], [-1]
    index: dict[tuple[int, ...], int] = {(): 0}
    heap = [(-top_v[0][0], (0,))] if depth > 0 and budget > 1 else []
    while heap and len(tokens) < budget:
        neg, path = heapq.heappop(heap)
        d, rank = len(path) - 1, path[-1]
        index[path] = len(tokens)
        parents.append(index[path[:-1]])
        tokens.append(top_i[d][rank])
        if d + 1 < depth:
            heapq.heappush(heap, (neg - top_v[d + 1][0], path + (0,)))
        if rank + 1 < width:
            heapq.heappush(heap, (neg + top_v[d][rank] - top_v[d][rank + 1], path[:-1] + (rank + 1,)))
    return tuple(tokens), TreeSpec(tuple(parents))
