"""The drafter's per-step computation as one module: what :class:`~jetspec_compile.drafter.JetSpecDrafter`
runs every ``draft`` and what backends export (:func:`draft_step_export_spec` gives the example inputs and
dynamic shapes of an export).

One call takes the row's cached context keys/values (``past``), the tapped hidden states of the tokens
committed since the last call (``hidden``, possibly none), and ``M`` blocks ``[anchor, MASK × (S-1)]``; it
returns the blocks' per-depth log-probabilities and the new tokens' keys/values (the caller appends them to
its cache). Shapes are written so that one exported graph serves every context length: the mask is built from
index comparisons (no in-place writes at shape-dependent offsets), with no Python value derived from a shape.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import JetSpecError
from ..kernels.cpu_linear import packed_linear, with_packed_linears
from .model import ParallelDrafter

__all__ = ["DraftStep", "visible_mask", "drafter_network", "draft_step_export_spec", "draft_inputs"]


def visible_mask(context: int | torch.SymInt, blocks: int, block_size: int, device=None,
                 causal: bool = True) -> torch.Tensor:
    """Boolean ``[1, 1, M*S, T + M*S]`` (True = may attend): every block sees the whole context of ``T``
    tokens and its own ``S`` positions (causally, or all of them with ``causal=False``); blocks never see each
    other."""
    n = blocks * block_size
    q = torch.arange(n, device=device)
    own = q[:, None] // block_size == q[None, :] // block_size  # [n, n]
    if causal:
        own = own & (q[None, :] <= q[:, None])
    ctx = torch.ones(n, context, dtype=torch.bool, device=device)  # [n, T]
    return torch.cat([ctx, own], dim=1)[None, None]


class DraftStep(nn.Module):
    """One drafting step of one row (batch 1) of a :class:`ParallelDrafter`.

    forward(hidden, positions, anchors, revealed, block_positions, past):
        hidden: [1, t, K*H] tapped target states of the tokens committed since the last call (t may be 0);
        positions: [1, t] their positions (``T .. T + t - 1``);
        anchors: [1, M] the root token of every block;
        revealed: [1, M, S-1] tokens given at block positions 1.. (``-1``: MASK, see ``block_states``);
        block_positions: [1, M*S] positions of the block tokens (``T + t .. T + t + S - 1`` per block);
        past: per drafter layer ``(k, v)`` [1, H_kv, T, D], the cached context keys/values (T may be 0).
    Returns ``(logprobs [M, depth, V] float32, [(k, v) [1, H_kv, t, D] per layer])`` (depth:
    ``model.cfg.depth``); with a draft vocabulary (``DrafterConfig.draft_vocab_size``) the last axis is its ``V'``
    entries, in ``model.draft_vocab`` order.
    """

    def __init__(self, model: ParallelDrafter, packed: bool = False):
        super().__init__()
        # packed: eager CPU inference with MKL-packed linears (the runtime's default step); exports use the plain one
        self.packed = packed
        self.model = with_packed_linears(model) if packed else model
        # The shared embedding and LM head are registered here (the drafter keeps them out of its own parameters)
        # so that an export sees one parameter per weight: unregistered, each use is lifted as its own constant
        # (the SmolLM2 drafter file held the 113 MB tied embedding three times).
        self.embed, self.lm_head = model.embed, model.lm_head
        weight = bias = None
        if model.draft_vocab is not None:  # the draft vocabulary's head rows, gathered once, in the network's dtype
            dtype = model.fc.weight.dtype
            weight, bias = (None if t is None else t.detach().to(dtype, copy=True) for t in model.head_rows())
            del self.lm_head  # unused: an export would otherwise carry the whole head
        self.register_buffer("head_weight", weight, persistent=False)
        self.register_buffer("head_bias", bias, persistent=False)

    def forward(self, hidden, positions, anchors, revealed, block_positions, past):
        new = self.model.context_kv(hidden, positions)
        kv = [(torch.cat([pk, nk], dim=2), torch.cat([pv, nv], dim=2)) for (pk, pv), (nk, nv) in zip(past, new)]
        cfg = self.model.cfg
        visible = visible_mask(kv[0][0].shape[2], anchors.shape[1], cfg.block_size, hidden.device, cfg.causal)
        # additive, not boolean: for a boolean mask SDPA's decomposition adds a NaN guard (IsNaN, which
        # TensorRT's ONNX parser lacks); no row is fully masked (every block token sees itself), so -inf is safe
        mask = torch.zeros(visible.shape, dtype=kv[0][0].dtype, device=hidden.device).masked_fill(~visible,
                                                                                                float("-inf"))
        head = None if self.head_weight is None else (self.head_weight, self.head_bias)
        if head is not None and self.packed:
            head = functools.partial(_packed_head, weight=self.head_weight, bias=self.head_bias)
        logits = self.model(anchors, block_positions, kv, mask, revealed, head)  # [1, M, D, V or V']
        return logits[0].float().log_softmax(-1), new


def _packed_head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return packed_linear(h.to(weight.dtype), weight, bias)


def drafter_network(drafter) -> ParallelDrafter:
    """The network of a drafter to export: a ``ParallelDrafter`` itself, or a JetSpec drafter's ``model``."""
    if isinstance(drafter, ParallelDrafter):
        return drafter
    if isinstance(getattr(drafter, "model", None), ParallelDrafter):
        return drafter.model
    raise JetSpecError(f"only the parallel drafter's step can be exported, got {type(drafter).__name__} "
                       "(training-free drafters such as NGramDrafter have no network and run in Python)")


def draft_step_export_spec(net) -> tuple[dict, dict]:
    """Example inputs and ``dynamic_shapes`` for exporting a :class:`~jetspec_compile.drafter.step.DraftStep`:
    cached context ``T``, new tokens ``t`` (both may be 0) and blocks ``M`` are dynamic."""
    cfg = net.cfg
    context, new = torch.export.Dim("context", min=0, max=1 << 16), torch.export.Dim("new", min=0, max=1 << 16)
    blocks = torch.export.Dim("blocks", min=1, max=256)
    dynamic = {"hidden": {1: new}, "positions": {1: new}, "anchors": {1: blocks}, "revealed": {1: blocks},
               "block_positions": {1: blocks * cfg.block_size},
               "past": [({2: context}, {2: context}) for _ in range(cfg.num_layers)]}
    return draft_inputs(net, context=11, new=3, blocks=2), dynamic


def draft_inputs(net, context: int, new: int, blocks: int, seed: int = 0) -> dict:
    """Random step inputs in ``DraftStep.forward``'s argument order: ``context`` cached tokens, ``new`` pending
    ones, ``blocks`` blocks (the second onward with a revealed depth-1 token)."""
    cfg = net.cfg
    g = torch.Generator().manual_seed(seed)
    device, dtype = net.fc.weight.device, net.fc.weight.dtype
    s, p = cfg.block_size, context + new
    revealed = torch.full((1, blocks, s - 1), -1, dtype=torch.long)
    if s > 1:
        revealed[0, 1:, 0] = torch.randint(0, cfg.vocab_size, (blocks - 1,), generator=g)
    inputs = {
        "hidden": torch.randn(1, new, len(cfg.tap_layers) * cfg.target_hidden_size, generator=g),
        "positions": torch.arange(context, p)[None],
        "anchors": torch.randint(0, cfg.vocab_size, (1, blocks), generator=g),
        "revealed": revealed,
        "block_positions": torch.arange(p, p + s).repeat(blocks)[None],
        "past": [tuple(torch.randn(1, cfg.num_kv_heads, context, cfg.head_dim, generator=g) for _ in "kv")
                 for _ in range(cfg.num_layers)],
    }
    cast = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    return {k: [tuple(cast(t) for t in kv) for kv in v] if k == "past" else cast(v) for k, v in inputs.items()}
