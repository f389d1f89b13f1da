"""Warping and drawing from token distributions, as HF's logits processors do, for whole batches at once.

:func:`warp_top` applies temperature, top-k and top-p to ``[N, V]`` logits sorting only the top ``candidates``
scores (top-p needs the order only up to its cutoff; the normaliser is a ``logsumexp`` over the whole vocabulary)
and reports rows whose nucleus reaches past them, so a caller can retry with more; :func:`warp_dense` gives the
full ``[N, V]`` distribution; :func:`draw` samples by the inverse CDF, which never picks a zero-probability token.
The runtime's acceptance and the drafter's drawn trees both warp through here, so the two distributions are
warped alike.
"""

from __future__ import annotations

import torch

__all__ = ["CANDIDATES", "warp_top", "warp_dense", "draw"]

#: the candidate counts tried in turn for top-p (the last, None, is the whole vocabulary)
CANDIDATES = (64, 1024, None)


def warp_top(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             candidates: int | None = 64):
    """HF-warped probabilities of ``logits [N, V]`` on a support of the top tokens.

    Returns ``(probs [N, C], ids [N, C] or None, covered [N] bool or None)``: ``probs[r, j]`` is the warped
    probability of token ``ids[r, j]`` (0 for candidates that top-k/top-p removed; the rest of the vocabulary
    has probability 0). ``ids`` None means dense: ``C = V`` and column ``j`` is token ``j`` (no top-k/top-p).
    ``covered[r]`` False: row ``r``'s kept set may reach past the ``C`` candidates; retry with more
    (``candidates=None``: the whole vocabulary, always covered). Ties at the top-k boundary keep every tied token
    (as HF); at the top-p boundary tied tokens are ordered arbitrarily (as HF's sort).
    """
    scores = logits.float() / temperature  # [N, V]
    vocab = scores.shape[-1]
    k_keep = top_k if top_k and top_k < vocab else None
    use_p = top_p is not None and top_p < 1.0
    if k_keep is None and not use_p:
        return scores.softmax(-1), None, None
    c = vocab if candidates is None else min(vocab, candidates)
    if k_keep is not None:
        c = min(vocab, k_keep + 1)  # every top-k token is a candidate; one more shows ties past the k-th
    vals, ids = scores.topk(c, dim=-1)  # [N, C] descending
    covered = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    if k_keep is not None:
        kth = vals[:, k_keep - 1:k_keep]  # [N, 1]
        keep = vals >= kth
        if c > k_keep:
            covered = vals[:, -1] < kth[:, 0]  # a tie at the last candidate may continue past it
        logz = vals.masked_fill(~keep, float("-inf")).logsumexp(-1, keepdim=True)
    else:
        keep = torch.ones_like(vals, dtype=torch.bool)
        logz = scores.logsumexp(-1, keepdim=True)
    probs = (vals - logz).exp() * keep  # [N, C]
    if use_p:
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each candidate
        nucleus = before < top_p
        nucleus[:, 0] = True  # keep at least one token
        if k_keep is None and c < vocab:
            covered = probs.sum(-1) >= top_p  # the first token past the candidates would be removed
        keep = keep & nucleus
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True), ids, covered


def warp_dense(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None) -> torch.Tensor:
    """The warped distribution of ``logits [N, V]`` as a dense ``[N, V]`` tensor (candidates widened as needed)."""
    for candidates in CANDIDATES:
        probs, ids, covered = warp_top(logits, temperature, top_k, top_p, candidates)
        if ids is None:
            return probs
        if covered is None or bool(covered.all()):
            break
    return torch.zeros(logits.shape, dtype=probs.dtype, device=probs.device).scatter_(-1, ids, probs)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column index drawn from each row of ``probs [N, C]`` (rows need not be normalized) with uniforms ``u [N]``."""
    cdf = probs.cumsum(-1)  # [N, C]
    picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).contiguous(), right=True)
    return picked.squeeze(-1).clamp_(max=probs.shape[-1] - 1)
