"""Batched lossless acceptance for sampling: every row and node of a verified tree in a few tensor ops.

The scalar rules in :mod:`~jetspec_compile.runtime.acceptance` warp and sample node by node (a full sort of the
vocabulary per node for top-p). Here one step does, for all ``N = B * n`` nodes at once:

1. :func:`warp_top` — temperature, top-k, top-p on ``[N, V]`` logits. Top-p needs the probabilities in
   descending order only up to the cutoff, so only the top ``candidates`` scores are sorted (``topk``); the
   normalizer is a ``logsumexp`` over the whole vocabulary. A row whose nucleus reaches past the candidates is
   reported (``covered`` False) and the caller retries with more candidates (the whole vocabulary last), so the
   result is always HF's distribution.
2. A draw at every node (sample-and-follow) or the recursive rejection procedure at every node (rejection
   sampling with drafter probabilities): each node's outcome uses its own randomness, so deciding every node up
   front and then walking the tree from the root gives exactly the node-by-node procedure's distribution.
3. One transfer to the host (``tolist``), as greedy decoding does, then a walk over the tree in Python (no
   vocabulary-sized work per node).

Draws use the inverse CDF (``searchsorted`` over a cumulative sum), which never picks a zero-probability token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..drafter.protocol import DraftTree
from ..warp import CANDIDATES, draw, warp_dense, warp_top
from .acceptance import accept_greedy, children_of

__all__ = ["warp_top", "warp_dense", "draw", "accept_sampled"]

def _children_table(trees: Sequence[DraftTree], n: int) -> torch.Tensor:
    """``[B, n, K]``: node indices of every node's children in child order, -1 padded (K = most children)."""
    kids = [children_of(t.tree) for t in trees]
    width = max(1, max(len(c) for ks in kids for c in ks))
    table = torch.full((len(trees), n, width), -1, dtype=torch.long)
    for r, ks in enumerate(kids):
        for node, c in enumerate(ks):
            table[r, node, :len(c)] = torch.tensor(c, dtype=torch.long)
    return table


def _column_of(ids: torch.Tensor | None, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Support column of each token ``tokens [N, K]`` and whether it is in the support (``ids [N, C]``)."""
    if ids is None:
        return tokens.clamp(min=0), tokens >= 0
    match = ids.unsqueeze(1) == tokens.unsqueeze(-1)  # [N, K, C]
    return match.int().argmax(-1), match.any(-1)


def _reject(probs, ids, q, child_tokens, child_valid, u):
    """Recursive rejection sampling without replacement at every node at once.

    probs/ids: the target's warped distribution on its support ``[N, C]``; q: ``[N, V]`` the distribution each
    node's children were drawn from; child_tokens/child_valid: ``[N, K]`` in child order; u: ``[N, K]``.
    Returns ``(accepted child slot [N] or -1, final distribution [N, C] to draw the bonus token from,
    bad [N]: a child with draft probability 0)``.
    """
    tok = child_tokens.clamp(min=0)
    qx = q.gather(-1, tok) * child_valid  # [N, K] q of every child
    qs = q if ids is None else q.gather(-1, ids)  # [N, C] q on the target's support
    col, inside = _column_of(ids, child_tokens)
    mass = q.sum(-1)  # [N] q's remaining mass (children tried so far removed)
    mass = torch.where(mass > 0, mass, torch.ones_like(mass))
    p = probs
    removed = torch.zeros_like(qs, dtype=torch.bool)
    accepted = torch.full(mass.shape, -1, dtype=torch.long, device=mass.device)
    bad = (child_valid & (qx <= 0)).any(-1)
    for j in range(child_tokens.shape[1]):
        live = child_valid[:, j] & (accepted < 0)
        px = p.gather(-1, col[:, j:j + 1])[:, 0] * inside[:, j]  # [N] residual target probability of child j
        take = live & (u[:, j] * qx[:, j] < px * mass)  # u < p(x) / q(x), q(x) = qx / mass
        accepted = torch.where(take, j, accepted)
        step = live & ~take
        residual = (p - qs.masked_fill(removed, 0.0) / mass[:, None]).clamp_(min=0.0)  # [N, C]
        total = residual.sum(-1, keepdim=True)
        cols = torch.nn.functional.one_hot(col[:, j], p.shape[-1]).bool() & inside[:, j:j + 1]  # [N, C]
        fallback = p.masked_fill(cols, 0.0)  # q covered p exactly (measure zero): p without x
        residual = torch.where(total > 0, residual, fallback)
        residual = residual / residual.sum(-1, keepdim=True).clamp(min=torch.finfo(residual.dtype).tiny)
        p = torch.where(step[:, None], residual, p)
        mass = torch.where(step, mass - qx[:, j], mass)
        mass = torch.where(mass > 0, mass, torch.ones_like(mass))
        removed = removed | (cols & step[:, None])
    return accepted, p, bad


def accept_sampled(logits: torch.Tensor, trees: Sequence[DraftTree], temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None) -> list[tuple[list[int], int]]:
    """Per row: (accepted node path, bonus token) of a sampled step; ``logits [B, n, V]`` from verification.

    Rows whose tree has ``probs`` use recursive rejection sampling without replacement, the others
    sample-and-follow (see :mod:`~jetspec_compile.runtime.acceptance`). Exactly those rules' distribution.
    """
    batch, n, vocab = logits.shape
    device = logits.device
    flat = logits.reshape(batch * n, vocab)  # [N, V]
    real = torch.tensor([[i < len(t.tokens) for i in range(n)] for t in trees], device=device).reshape(-1)
    with_q = [r for r, t in enumerate(trees) if t.probs is not None]
    kids = _children_table(trees, n).to(device)  # [B, n, K]
    for candidates in CANDIDATES:
        probs, ids, covered = warp_top(flat, temperature, top_k, top_p, candidates)  # [N, C]
        u = torch.rand(batch * n, kids.shape[-1] + 1, generator=generator).to(device)  # [N, K+1]
        picked = draw(probs, u[:, 0])  # [N] sample-and-follow draw at every node
        token = picked if ids is None else ids.gather(-1, picked[:, None])[:, 0]
        slot = torch.full_like(token, -1)
        bad = torch.zeros_like(real)
        if with_q:
            rows = torch.tensor(with_q, device=device)
            nodes = (rows[:, None] * n + torch.arange(n, device=device)).reshape(-1)  # [Nq]
            q = torch.stack([_pad_nodes(trees[r].probs, n).to(device) for r in with_q]).reshape(-1, vocab)
            child = kids[rows].reshape(len(with_q) * n, -1)  # [Nq, K]
            tokens = torch.stack([_node_tokens(trees[r], n) for r in with_q]).to(device)  # [Bq, n]
            child_tokens = torch.where(child >= 0, tokens.repeat_interleave(n, 0).gather(-1, child.clamp(min=0)), -1)
            sub_ids = None if ids is None else ids[nodes]
            accepted, residual, bad_q = _reject(probs[nodes], sub_ids, q.float(), child_tokens, child >= 0,
                                                u[nodes, 1:])
            bonus = draw(residual, u[nodes, 0])
            bonus = bonus if sub_ids is None else sub_ids.gather(-1, bonus[:, None])[:, 0]
            token = token.index_copy(0, nodes, bonus)
            slot = slot.index_copy(0, nodes, accepted)
            bad = bad.index_copy(0, nodes, bad_q)
        ok = torch.ones_like(real) if covered is None else covered | ~real  # padding nodes never need a retry
        host = torch.stack([token, slot, bad.long() * real, ok.long()]).reshape(4, batch, n).tolist()  # one sync
        if all(all(row) for row in host[3]):
            break
    tokens_h, slots_h, bad_h = host[0], host[1], host[2]
    out = []
    for r, t in enumerate(trees):
        if t.probs is None:
            out.append(accept_greedy(tokens_h[r], t.tree, t.tokens))  # follow the child with the drawn token
            continue
        node = next((i for i, b in enumerate(bad_h[r]) if b), None)
        if node is not None:
            raise ValueError(f"row {r}: a child of node {node} has draft probability 0; probs must be the "
                             "distribution the children were drawn from")
        kids_r = children_of(t.tree)
        node, path = 0, [0]
        while slots_h[r][node] >= 0:
            node = kids_r[node][slots_h[r][node]]
            path.append(node)
        out.append((path, tokens_h[r][node]))
    return out


def _pad_nodes(probs: torch.Tensor, n: int) -> torch.Tensor:
    return probs if probs.shape[0] == n else torch.cat([probs, probs.new_zeros(n - probs.shape[0], probs.shape[1])])


def _node_tokens(tree: DraftTree, n: int) -> torch.Tensor:
    return torch.tensor(list(tree.tokens) + [0] * (n - len(tree.tokens)), dtype=torch.long)
