"""Best-first draft-tree construction from per-depth draft distributions.

Given ``logprobs [D, V]`` (one distribution per depth from one drafter forward), nodes are named by the ranks of
their tokens at each depth; a node's score is the sum of its path's log-probabilities. A heap pops the best
candidate, adds it, and pushes its first child and its next sibling, until ``budget`` nodes (root included)
exist. Every parent at depth ``d`` draws its children from the same top-``width`` tokens of depth ``d + 1``
(per-depth marginals, as in the JetSpec reference code). Parents always precede their children.

Path-conditioned branches go one step further: ``branches[r]`` holds the depth-2.. distributions re-drafted with
the rank-``r`` depth-1 token given (a second drafter pass), and the subtree under that depth-1 node draws from
them instead of the shared marginals.
"""

from __future__ import annotations

import heapq

import torch

from ..tree import TreeSpec

__all__ = ["best_first_tree"]


def best_first_tree(root: int, logprobs: torch.Tensor, budget: int, width: int,
                    branches: dict[int, torch.Tensor] | None = None) -> tuple[tuple[int, ...], TreeSpec]:
    """Return ``(tokens, tree)`` with at most ``budget`` nodes; node 0 is ``root``.

    logprobs: ``[D, V]`` draft log-probabilities of depths 1..D. branches: optional ``{rank: [D', V]}``, the
    log-probabilities of depths 2..D'+1 given the rank-``rank`` depth-1 token (see the module docstring).
    """
    depth = logprobs.shape[0]
    if budget < 1 or width < 1:
        raise ValueError(f"budget and width must be >= 1, got {budget} and {width}")
    width = min(width, logprobs.shape[1])

    def top(table: torch.Tensor):
        v, i = table.float().topk(width, dim=-1)  # [rows, W]
        return v.tolist(), i.tolist()

    shared = top(logprobs)
    per_branch = {rank: top(table) for rank, table in (branches or {}).items()}

    def row(path: tuple[int, ...]):
        """(top values, top ids) of the node at ``path`` (ranks per depth), or None past the drafted depth."""
        d = len(path) - 1
        if d > 0 and path[0] in per_branch:
            v, i = per_branch[path[0]]
            return (v[d - 1], i[d - 1]) if d - 1 < len(v) else None
        return (shared[0][d], shared[1][d]) if d < depth else None

    tokens, parents = [root], [-1]
    index: dict[tuple[int, ...], int] = {(): 0}
    heap = [(-shared[0][0][0], (0,))] if depth > 0 and budget > 1 else []
    while heap and len(tokens) < budget:
        neg, path = heapq.heappop(heap)
        rank = path[-1]
        values, ids = row(path)
        index[path] = len(tokens)
        parents.append(index[path[:-1]])
        tokens.append(ids[rank])
        child = row(path + (0,))
        if child is not None:
            heapq.heappush(heap, (neg - child[0][0], path + (0,)))
        if rank + 1 < width:
            heapq.heappush(heap, (neg + values[rank] - values[rank + 1], path[:-1] + (rank + 1,)))
    return tuple(tokens), TreeSpec(tuple(parents))
