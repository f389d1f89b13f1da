"""Draft trees whose tokens are drawn from the drafter's warped distributions, for rejection sampling.

Recursive rejection sampling (:mod:`~jetspec_compile.runtime.sampling`) is lossless when every node's children
were drawn *without replacement* from the distribution the tree reports for that node. A best-first tree picks
its children deterministically, so it carries no such distribution; this tree keeps the best-first *shape* (how
many children each node gets, decided from the drafter's scores alone, before anything is drawn) and fills it by
drawing each node's children independently from the drafter's distribution at the children's depth, warped like
the target's (temperature, top-k, top-p). Draws use the Gumbel top-k trick: the top ``k`` of ``log q + Gumbel``
are ``k`` draws without replacement from ``q`` in draw order.
"""

from __future__ import annotations

import torch

from ..tree import TreeSpec, depths
from ..warp import warp_dense
from .protocol import DraftTree
from .tree_builder import best_first_tree

__all__ = ["drawn_tree"]

#: log-probability standing in for log 0 when shaping the tree (finite, so sums of scores never give NaN)
_LOG_ZERO = -1e30


def drawn_tree(root: int, logprobs: torch.Tensor, budget: int, width: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
               vocab: torch.Tensor | None = None, vocab_size: int | None = None) -> DraftTree:
    """A tree of at most ``budget`` nodes under ``root`` with drawn children and their distributions (``probs``).

    logprobs: ``[D, V']`` the drafter's log-probabilities of depths 1..D (over its draft vocabulary when
    ``vocab [V']`` maps entries to token ids; then ``vocab_size`` is the target's vocabulary size).
    """
    q = warp_dense(logprobs.float(), temperature, top_k, top_p)  # [D, V'] warped like the target's
    depth = q.shape[0]
    logq = q.log().clamp(min=_LOG_ZERO)
    _, shape, scores = best_first_tree(root, logq, budget, width, with_scores=True)
    keep = [i for i, s in enumerate(scores) if s > _LOG_ZERO / 2]  # no node past a depth's support
    parents = [shape.parents[i] for i in keep]  # scores never rise from parent to child: keep is a prefix-closed set
    where = {old: new for new, old in enumerate(keep)}
    tree = TreeSpec(tuple(-1 if p < 0 else where[p] for p in parents))
    node_depth = depths(tree).tolist()
    kids: list[list[int]] = [[] for _ in range(len(tree))]
    for child, parent in enumerate(tree.parents):
        if parent >= 0:
            kids[parent].append(child)
    tokens = [root] + [0] * (len(tree) - 1)
    for d in range(depth):
        nodes = [i for i, c in enumerate(kids) if c and node_depth[i] == d]
        if not nodes:
            continue
        most = max(len(kids[i]) for i in nodes)
        uniform = torch.rand(len(nodes), q.shape[1], generator=generator).clamp_(min=torch.finfo(torch.float32).tiny)
        keys = logq[d] - (-uniform.log()).log()  # [m, V'] log q + Gumbel noise
        drawn = keys.topk(most, dim=-1).indices.tolist()
        for row, node in enumerate(nodes):
            for child, index in zip(kids[node], drawn[row]):
                tokens[child] = index
    full = vocab_size if vocab is not None else q.shape[1]
    table = torch.zeros(depth + 1, full)  # row d: the distribution children at depth d + 1 are drawn from
    if vocab is not None:
        table[:depth, vocab] = q
        tokens = [root] + vocab[torch.tensor(tokens[1:], dtype=torch.long)].tolist()
    else:
        table[:depth] = q
    return DraftTree(tuple(tokens), tree, table[torch.tensor(node_depth)])
