"""Best-first draft-tree construction from per-depth draft distributions.

Given ``logprobs [D, V]`` (one distribution per depth from one drafter forward), nodes are named by the ranks of
their tokens at each depth; a node's score is the sum of its path's log-probabilities. A heap pops the best
candidate, adds it, and pushes its first child and its next sibling, until ``budget`` nodes (root included)
exist. Every parent at depth ``d`` draws its children from the same top-``width`` tokens of depth ``d + 1``
(per-depth marginals, as in the JetSpec reference code). Parents always precede their children.

Path-conditioned branches go one step further: ``branches[r]`` holds the depth-2.. distributions re-drafted with
the rank-``r`` depth-1 token given (a second drafter pass), and the subtree under that depth-1 node draws from
them instead of the shared marginals.

:func:`merge_scored` and :func:`graft` merge a second tree into a drafted one within the same budget (by score,
or with the second tree's nodes first), through :class:`~jetspec_compile.drafter.trie.Trie`.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import torch

from ..tree import TreeSpec
from .trie import Trie

__all__ = ["best_first_tree", "graft", "merge_scored"]


def best_first_tree(root: int, logprobs: torch.Tensor, budget: int, width: int,
                    branches: dict[int, torch.Tensor] | None = None, with_scores: bool = False):
    """Return ``(tokens, tree)`` with at most ``budget`` nodes; node 0 is ``root``. With ``with_scores`` also
    each node's path log-probability (``0.0`` for the root; nodes come in decreasing score).

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

    tokens, parents, scores = [root], [-1], [0.0]
    index: dict[tuple[int, ...], int] = {(): 0}
    heap = [(-shared[0][0][0], (0,))] if depth > 0 and budget > 1 else []
    while heap and len(tokens) < budget:
        neg, path = heapq.heappop(heap)
        rank = path[-1]
        values, ids = row(path)
        index[path] = len(tokens)
        parents.append(index[path[:-1]])
        tokens.append(ids[rank])
        scores.append(-neg)
        child = row(path + (0,))
        if child is not None:
            heapq.heappush(heap, (neg - child[0][0], path + (0,)))
        if rank + 1 < width:
            heapq.heappush(heap, (neg + values[rank] - values[rank + 1], path[:-1] + (rank + 1,)))
    if with_scores:
        return tuple(tokens), TreeSpec(tuple(parents)), scores
    return tuple(tokens), TreeSpec(tuple(parents))


def merge_scored(a: tuple[Sequence[int], TreeSpec, Sequence[float]], b: tuple[Sequence[int], TreeSpec, Sequence[float]],
                 budget: int) -> tuple[tuple[int, ...], TreeSpec]:
    """The ``budget`` best nodes of the union of two scored trees with the same root.

    Each of ``a`` and ``b`` is ``(tokens, tree, scores)`` with scores that never rise from parent to child (path
    log-probabilities). A node in both (same token path) scores the larger of its two scores, which keeps that
    property, so the best ``budget`` nodes (ties: shallower first) always include their parents. They come in
    decreasing score, so a prefix of the result is what a smaller budget would have kept.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    trie = Trie.from_tree(*a)
    trie.merge(Trie.from_tree(*b))
    return trie.best(budget)


def graft(tokens: Sequence[int], tree: TreeSpec, extra_tokens: Sequence[int], extra: TreeSpec,
          budget: int) -> tuple[tuple[int, ...], TreeSpec]:
    """Merge tree ``extra`` (same root) into ``(tokens, tree)``, keeping at most ``budget`` nodes.

    ``extra``'s nodes that the tree already has (same token under the same parent) are shared; the others are
    added. To make room, the tree is cut to a prefix of its nodes first (a best-first tree's prefix is the tree a
    smaller budget would have built), and ``extra``'s nodes that still do not fit are dropped (with their
    subtrees). In the result ``extra``'s nodes come first (after the root), then the tree's in their order, so a
    prefix of the merged tree is again what a smaller budget would have drafted (the budget controller reads
    ``τ`` of smaller budgets from prefixes). Node 0 stays the root; parents stay before children.
    """
    if extra_tokens and tokens and extra_tokens[0] != tokens[0]:
        raise ValueError(f"cannot graft a tree rooted at {extra_tokens[0]} onto one rooted at {tokens[0]}")
    other = Trie.from_tree(extra_tokens, extra)
    keep = max(1, min(len(tokens), budget - Trie.from_tree(tokens, tree).new_nodes(other)))
    trie = Trie.from_tree(tokens[:keep], TreeSpec(tree.parents[:keep]))
    where = trie.merge(other, limit=budget)
    first = list(dict.fromkeys(where[n] for n in sorted(where)))  # root, then extra's nodes in extra's order
    placed = set(first)
    return trie.ordered(first + [n for n in range(len(trie)) if n not in placed])
