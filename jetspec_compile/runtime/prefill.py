"""Prefill: committing a prompt to a :class:`~jetspec_compile.runtime.verifier.TreeVerifier`'s cache.

Two ways fill the same state. :func:`prefill_with_graph` runs the prompt through the verify graph itself as
chains of ``n`` tokens (a chain is a tree); :func:`prefill_with_model` runs one forward of the model (what
``generate`` runs; one per row over its own tokens for a left-padded batch) and copies its keys and values into
the static cache, which is several times faster for long prompts. The model path is used only where it provably
fills the same state: no tap on the last layer (HF returns that one after the final norm), one full
``[B, H_kv, P, D]`` cache tensor per layer, and agreement with the graph path on a random prompt the first time
(:func:`model_prefill_agrees`).
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

from ..compat import returned_cache

logger = logging.getLogger(__name__)

__all__ = ["prefill_with_graph", "prefill_with_model", "model_prefill_agrees"]


@functools.lru_cache(maxsize=64)
def _takes_logits_to_keep(cls) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def prefill_with_graph(verifier, input_ids: torch.Tensor, real: torch.Tensor, positions: torch.Tensor, n: int):
    """Prefill ``[B, P]`` prompts (``real``: not padding; ``positions``: their position ids) in chains of ``n``
    tokens through the verify graph. Returns ``(logits [B, V], hidden [B, P, K*H])``."""
    p = input_ids.shape[1]
    starts = list(range(0, max(p - n, 0), n)) + [max(p - n, 0)]
    pad = max(n - p, 0)
    ids = torch.nn.functional.pad(input_ids, (0, pad))
    real_padded = torch.nn.functional.pad(real, (0, pad))
    pos_padded = torch.nn.functional.pad(positions, (0, pad))
    causal = torch.ones(n, n, dtype=torch.bool, device=verifier.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=verifier.device)
    hidden_parts, covered = [], 0
    for start in starts:
        cols = real_padded[:, start:start + n]
        tree_mask = (causal[None] & cols[:, None, :]) | eye[None]  # [B, N, N]
        verifier.cache.valid[:, :start] = real[:, :start]
        verifier.cache.positions[:, :start] = positions[:, :start]
        verifier.base_position.zero_()
        out, hidden, head = verifier._run(ids[:, start:start + n], pos_padded[:, start:start + n], tree_mask, start)
        hidden_parts.append(hidden[:, covered - start:min(p, start + n) - start])
        covered = min(p, start + n)
    verifier.cache.valid[:, :p] = real
    verifier.cache.positions[:, :p] = positions
    verifier.cache.length = p
    verifier.base_position = real.long().sum(1)
    last = p - 1 - starts[-1]
    return verifier._logits(out[:, last], head), torch.cat(hidden_parts, dim=1)


def _model_forward(verifier, input_ids, attention_mask, positions):
    """One forward of the model over a prompt; ``(output, layers of its cache)``, the layers None where the cache
    has another layout than one ``[B, H_kv, P, D]`` keys and values tensor per layer of ours."""
    kwargs = {"logits_to_keep": 1} if _takes_logits_to_keep(type(verifier.model)) else {}
    with verifier.prefill_mode:  # packed linears where the verifier was given a kernel setting for them
        out = verifier.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=True, output_hidden_states=True, **kwargs)
    layers = getattr(returned_cache(out), "layers", None)
    kv = verifier.cache.kv
    shape = (input_ids.shape[0], kv.shape[2], input_ids.shape[1], kv.shape[4])
    if layers is None or 2 * len(layers) != kv.shape[0] or any(
            tuple(getattr(layer, name, torch.empty(0)).shape) != shape
            for layer in layers for name in ("keys", "values")):
        return out, None
    return out, layers


def _store(kv: torch.Tensor, layers, rows: slice, start: int, end: int) -> None:
    """Copy the model cache's keys and values of every layer into ``kv`` rows ``rows``, slots ``start:end``."""
    for i, layer in enumerate(layers):
        kv[2 * i, rows, :, start:end] = layer.keys
        kv[2 * i + 1, rows, :, start:end] = layer.values


def _prefill_rows(verifier, input_ids: torch.Tensor, real: torch.Tensor):
    """A left-padded batch, one forward per row over its real tokens only: no compute on padding (a third of a
    batch of 16 mixed-length prompts) and no padding rows for the model to leave undefined. The padding slots are
    zeroed (they stay masked, but must be finite). Returns ``(logits [B, V], hidden [B, P, K*H])`` or None."""
    b, p = input_ids.shape
    kv = verifier.cache.kv
    logits, hidden = [], None
    for row in range(b):
        start = p - int(real[row].sum())
        ids = input_ids[row:row + 1, start:]
        out, layers = _model_forward(verifier, ids, None, torch.arange(p - start, device=ids.device)[None])
        if layers is None:
            return None
        kv[:, row, :, :start] = 0
        _store(kv, layers, slice(row, row + 1), start, p)
        taps = torch.cat([out.hidden_states[i + 1][0] for i in verifier.tap_layers], dim=-1)
        if hidden is None:
            hidden = taps.new_zeros(b, p, taps.shape[-1])
        hidden[row, start:] = taps
        logits.append(out.logits[0, -1])
    return torch.stack(logits), hidden


@torch.no_grad()
def prefill_with_model(verifier, input_ids: torch.Tensor, real: torch.Tensor, positions: torch.Tensor):
    """Prefill through the model's forward (one per row for a left-padded batch); None where its cache has another
    layout or its padding rows are not finite (the graph prefill that follows then rewrites every slot this may
    have written)."""
    b, p = input_ids.shape
    left_padded = bool((real.long().diff(dim=1) >= 0).all())  # every row: padding, then its tokens
    if b > 1 and not bool(real.all()) and left_padded:
        done = _prefill_rows(verifier, input_ids, real)
        if done is None:
            return None
        logits, hidden = done
    else:
        out, layers = _model_forward(verifier, input_ids, real.long(), positions)
        if layers is None:
            return None
        kv = verifier.cache.kv
        _store(kv, layers, slice(None), 0, p)
        hidden = torch.cat([out.hidden_states[i + 1] for i in verifier.tap_layers], dim=-1)
        if not bool(real.all()) and not (bool(torch.isfinite(kv[:, :, :, :p]).all())
                                         and bool(torch.isfinite(hidden).all())):
            return None  # a model that leaves fully masked (padding) rows undefined: masked NaNs would spread
        logits = out.logits[:, -1]
    verifier.cache.valid[:, :p] = real
    verifier.cache.positions[:, :p] = positions
    verifier.cache.length = p
    verifier.base_position = real.long().sum(1)
    return logits, hidden


def model_prefill_agrees(verifier) -> bool:
    """Prefill a short random prompt both ways (through the verify graph itself: nothing new compiles) and
    compare the caches, taps and logits."""
    p = min(verifier.budget, verifier.cache.max_length - 1)
    ids = torch.randint(0, verifier.vocab_size, (verifier.batch_size, p), generator=torch.Generator().manual_seed(1))
    ids = ids.to(verifier.device)
    verifier._model_prefill = False
    logits, hidden = verifier.prefill(ids)
    state = verifier.cache.kv[:, :, :, :p].clone()
    verifier.reset()
    got = prefill_with_model(verifier, ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(p)[None].expand(
        verifier.batch_size, p).to(verifier.device))
    if got is None:
        logger.info("model prefill off: %s's cache has another layout", type(verifier.model).__name__)
        return False
    tol = 1e-3 if state.dtype == torch.float32 else 5e-2
    for name, a, e in (("keys/values", verifier.cache.kv[:, :, :, :p], state), ("taps", got[1], hidden),
                       ("logits", got[0], logits)):
        err = float((a.float() - e.float()).abs().max() / e.float().abs().max().clamp(min=1.0))
        if not err <= tol:
            logger.info("model prefill off: its %s differ from the graph's (relative error %.1e)", name, err)
            return False
    return True
