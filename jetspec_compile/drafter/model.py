"""The JetSpec-style parallel tree drafter.

One forward drafts a whole block: ``[anchor, MASK × D]`` at positions ``p .. p + D`` (the anchor is the pending
token at position ``p``), attending causally within the block and, in every layer, to keys/values projected
from the *fused context*: the target's hidden states at K tapped layers for the committed tokens ``0 .. p-1``,
concatenated, projected by a bias-free ``K·H → H`` linear layer and RMS-normalised ("KV injection"). As in a
causal LM, the output at block index ``i`` (0..S-1) is the draft distribution of the token at depth ``i + 1``,
so one forward drafts ``S = block_size`` depths (the anchor's own output predicts depth 1). The token embedding
and LM head are the target's, shared and frozen (never saved with the drafter).

``DrafterConfig.style="dflash"`` is the shape serving engines run (vLLM's and SGLang's native DFlash drafter,
:mod:`~jetspec_compile.drafter.dflash_format`): per-head RMSNorm on queries and keys before RoPE (also on the
injected context keys), and in-place MASK prediction: in the block ``[anchor, MASK × (S-1)]`` each MASK slot
predicts the token *at its own position* (slot ``i`` drafts depth ``i``) and the anchor's output is unused, so one
forward drafts ``S - 1`` depths; attention inside the block may be bidirectional (``causal=False``). Either way
:meth:`ParallelDrafter.forward` returns one distribution per depth, so the tree construction on top is the same.

The layer code is generic (RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP), independent of the
target's family: only the hidden size, vocabulary and tapped layers must match.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DrafterConfig", "ParallelDrafter", "STYLES"]

#: drafter shapes (DrafterConfig.style)
STYLES = ("jetspec", "dflash")


@dataclass(frozen=True)
class DrafterConfig:
    """Shape of a parallel drafter and the target it belongs to.

    Attributes:
        target_hidden_size / vocab_size / tap_layers: what the target must have (checked on attach).
        target_num_layers: layer count of the target (a checkpoint for another target is refused).
        num_layers, num_heads, num_kv_heads, head_dim, intermediate_size: the drafter's decoder stack.
        block_size: anchor + (block_size - 1) mask positions; one forward drafts ``block_size`` depths.
        rope_theta, rms_norm_eps: rotary base and norm epsilon.
        target_name: free-form name of the target (reported in errors).
        draft_vocab_size: 0 drafts over the whole vocabulary; ``n > 0``: the drafter proposes only the ``n``
            tokens in its ``draft_vocab`` buffer (frequent tokens of the target's own outputs, see
            :func:`~jetspec_compile.drafter.vocab.frequent_tokens`), and its LM head multiplies by those rows
            only. Lossless either way: any draft is verified by the target.
        style: ``"jetspec"`` (every block slot predicts the next position; no q/k norms) or ``"dflash"`` (each MASK
            slot predicts its own position, q/k per-head RMSNorm: the layout vLLM and SGLang serve).
        causal: attention inside a block is causal (True) or bidirectional (False, DFlash's default; ``"dflash"``
            style only: with ``"jetspec"`` a later slot would see the token an earlier one must predict).
        mask_token_id: ``"dflash"`` style: the token id serving engines feed in MASK slots (its embedding is
            replaced by the drafter's ``mask_embedding``); an id the target never emits. -1: unset.
    """

    target_hidden_size: int
    vocab_size: int
    tap_layers: tuple[int, ...]
    target_num_layers: int
    num_layers: int = 2
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    block_size: int = 8
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    target_name: str = ""
    draft_vocab_size: int = 0
    style: str = "jetspec"
    causal: bool = True
    mask_token_id: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "tap_layers", tuple(int(i) for i in self.tap_layers))
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if not self.tap_layers:
            raise ValueError("a drafter needs at least one tapped target layer")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must lie in [0, vocab_size={self.vocab_size}], "
                             f"got {self.draft_vocab_size}")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.style == "jetspec" and not self.causal:
            raise ValueError("the 'jetspec' style needs causal block attention (each slot predicts the next "
                             "position); use style='dflash' for a bidirectional block")
        if self.style == "dflash" and self.block_size < 2:
            raise ValueError(f"a 'dflash' block is the anchor plus at least one MASK slot: block_size >= 2, got "
                             f"{self.block_size}")
        if not -1 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id must lie in [0, {self.vocab_size}) (or -1: unset), "
                             f"got {self.mask_token_id}")

    @property
    def depth(self) -> int:
        """Depths drafted per forward (``"dflash"``: the anchor's slot drafts none)."""
        return self.block_size - 1 if self.style == "dflash" else self.block_size

    @property
    def qk_norm(self) -> bool:
        """Whether the layers normalise queries and keys per head (the DFlash / Qwen3 layer)."""
        return self.style == "dflash"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "DrafterConfig":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"drafter config has unknown fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def for_target(cls, target_config, tap_layers, **overrides) -> "DrafterConfig":
        """A drafter sized after the target (its head layout and MLP width)."""
        heads = target_config.num_attention_heads
        head_dim = getattr(target_config, "head_dim", None) or target_config.hidden_size // heads
        rope = getattr(target_config, "rope_parameters", None) or {}
        base = dict(
            target_hidden_size=target_config.hidden_size, vocab_size=target_config.vocab_size,
            tap_layers=tuple(tap_layers), target_num_layers=target_config.num_hidden_layers,
            num_heads=heads, num_kv_heads=getattr(target_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=getattr(target_config, "intermediate_size", 4 * target_config.hidden_size),
            rope_theta=float(rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0))),
            target_name=os.path.basename(str(getattr(target_config, "_name_or_path", "") or "").rstrip("/"))
            or getattr(target_config, "model_type", ""),  # a name, never a local path
        )
        base.update(overrides)
        return cls(**base)


def vocab_problem(ids: torch.Tensor, vocab_size: int) -> str | None:
    """What is wrong with draft-vocabulary ``ids`` (out of range, repeated), or None."""
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        return f"ids must lie in [0, {vocab_size})"
    if ids.unique().numel() != ids.numel():
        return "ids must be distinct"
    return None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x [B, heads, S, D]`` by ``positions [B, S]`` (half-split rotary, as Llama)."""
    dim = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    freqs = positions[:, None, :, None].float() * inv  # [B, 1, S, D/2]
    cos, sin = freqs.cos(), freqs.sin()
    x1, x2 = x[..., : dim // 2].float(), x[..., dim // 2:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class DrafterLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        h = cfg.target_hidden_size
        self.cfg = cfg
        self.input_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(h, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, h, bias=False)
        if cfg.qk_norm:  # per-head RMSNorm of queries and keys, before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.post_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, n, self.cfg.head_dim).transpose(1, 2)  # [B, n, S, D]

    def _keys(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        k = self._heads(self.k_proj(x), self.cfg.num_kv_heads)
        if self.cfg.qk_norm:
            k = self.k_norm(k)
        return rotary(k, positions, self.cfg.rope_theta)  # [B, H_kv, S, D]

    def context_kv(self, ctx: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values injected from the fused context ``ctx [B, T, H]`` at ``positions [B, T]``."""
        return self._keys(ctx, positions), self._heads(self.v_proj(ctx), self.cfg.num_kv_heads)  # [B, H_kv, T, D]

    def forward(self, x, positions, ctx_k, ctx_v, mask):
        """x: [B, S, H] block states; ctx_k/v: [B, H_kv, T, D]; mask: additive [B or 1, 1, S, T + S]."""
        cfg = self.cfg
        h = self.input_norm(x)
        q = self._heads(self.q_proj(h), cfg.num_heads)
        q = rotary(self.q_norm(q) if cfg.qk_norm else q, positions, cfg.rope_theta)
        k = self._keys(h, positions)
        v = self._heads(self.v_proj(h), cfg.num_kv_heads)
        k = torch.cat([ctx_k, k], dim=2)
        v = torch.cat([ctx_v, v], dim=2)
        rep = cfg.num_heads // cfg.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, s, _ = att.shape
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, s, -1))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class ParallelDrafter(nn.Module):
    """The drafter network. ``embed`` and ``lm_head`` are the target's modules, frozen and not registered as
    parameters of the drafter (they are neither trained nor saved)."""

    def __init__(self, cfg: DrafterConfig, embed: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.cfg = cfg
        h = cfg.target_hidden_size
        self.fc = nn.Linear(len(cfg.tap_layers) * h, h, bias=False)
        self.context_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(h))
        self.layers = nn.ModuleList(DrafterLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self._shared = (embed, lm_head)  # a tuple keeps them out of state_dict / parameters()
        # token ids the drafter proposes (saved with it; None: all), see DrafterConfig.draft_vocab_size
        self.register_buffer("draft_vocab", torch.arange(cfg.draft_vocab_size) if cfg.draft_vocab_size else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(0)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif p.dim() == 2:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        with torch.no_grad():
            for layer in self.layers:  # residual branches start small
                layer.o_proj.weight.mul_(0.1)
                layer.down_proj.weight.mul_(0.1)
            self.mask_embedding.copy_(torch.randn(self.mask_embedding.shape, generator=g) * 0.02)

    @property
    def embed(self) -> nn.Module:
        return self._shared[0]

    @property
    def lm_head(self) -> nn.Module:
        return self._shared[1]

    def head_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight (and bias) rows of the draft vocabulary (the whole head without one)."""
        weight, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        if self.draft_vocab is None:
            return weight, bias
        return weight[self.draft_vocab], None if bias is None else bias[self.draft_vocab]

    def restrict_vocab(self, token_ids) -> "ParallelDrafter":
        """A copy of this drafter that drafts only ``token_ids`` (same weights; its LM head is that many rows).
        ``None`` or an empty list gives a copy over the whole vocabulary."""
        ids = torch.as_tensor([] if token_ids is None else token_ids, dtype=torch.long).flatten()
        problem = vocab_problem(ids, self.cfg.vocab_size)
        if problem:
            raise ValueError(f"draft vocabulary {problem}")
        cfg = dataclasses.replace(self.cfg, draft_vocab_size=int(ids.numel()))
        state = {k: v for k, v in self.state_dict().items() if k != "draft_vocab"}
        if ids.numel():
            state["draft_vocab"] = ids
        return self._rebuilt(cfg, state, self.fc.weight.dtype)

    def cast(self, dtype: torch.dtype) -> "ParallelDrafter":
        """A copy of this drafter whose own weights are ``dtype`` (the shared embedding and LM head are left as
        they are; the network casts what it reads from them). ``self`` if it already is."""
        if self.fc.weight.dtype == dtype:
            return self
        return self._rebuilt(self.cfg, self.state_dict(), dtype)

    def _rebuilt(self, cfg: DrafterConfig, state: dict, dtype: torch.dtype) -> "ParallelDrafter":
        other = ParallelDrafter(cfg, self.embed, self.lm_head)
        other.load_state_dict(state)
        return other.to(device=self.fc.weight.device, dtype=dtype).train(self.training)

    def fuse(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tapped target hidden states ``[B, T, K*H]`` → fused context ``[B, T, H]``."""
        return self.context_norm(self.fc(hidden.to(self.fc.weight.dtype)))

    def context_kv(self, hidden: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the injected keys/values of context tokens (cached by the runtime drafter)."""
        ctx = self.fuse(hidden)
        return [layer.context_kv(ctx, positions) for layer in self.layers]

    def block_states(self, anchors: torch.Tensor, revealed: torch.Tensor | None = None) -> torch.Tensor:
        """``[anchor, MASK × D]`` embeddings for anchors ``[B, M]`` → ``[B, M * S, H]``.

        ``revealed`` ``[B, M, S - 1]`` (optional) puts known tokens in place of MASK (``-1`` keeps MASK): a
        block re-conditioned on a branch's own path prefix (path-conditioned trees).
        """
        b, m = anchors.shape
        s = self.cfg.block_size
        emb = self._embed_tokens(anchors)  # [B, M, H]
        masks = self.mask_embedding.expand(b, m, s - 1, emb.shape[-1])
        if revealed is not None:
            known = revealed >= 0
            masks = torch.where(known[..., None], self._embed_tokens(revealed.clamp(min=0)), masks)
        return torch.cat([emb[:, :, None], masks], dim=2).reshape(b, m * s, -1)  # no in-place: exportable

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; with a ``mask_token_id`` that token embeds as the mask, as serving engines do."""
        emb = self.embed(ids).to(self.mask_embedding.dtype)
        if self.cfg.mask_token_id >= 0:
            emb = torch.where((ids == self.cfg.mask_token_id)[..., None], self.mask_embedding, emb)
        return emb

    def forward(self, anchors, block_positions, ctx_kv, mask, revealed=None, head=None) -> torch.Tensor:
        """Draft logits for every block position.

        anchors: [B, M] anchor tokens; block_positions: [B, M * S]; ctx_kv: per layer (k, v) [B, H_kv, T, D];
        mask: additive [B or 1, 1, M * S, T + M * S]; revealed: optional [B, M, S - 1] known tokens at block
        positions 1.. (``-1`` = MASK); head: optional ``(weight [V', H], bias)`` in place of the full LM head
        (the draft vocabulary's rows, :meth:`head_rows`), or a function computing those logits from ``h``.
        Returns logits [B, M, D, V or V'], index i = depth i+1 (``D = cfg.depth``: the ``"jetspec"`` style reads
        them from block slots 0..S-1, the ``"dflash"`` style from the MASK slots 1..S-1).
        """
        x = self.block_states(anchors, revealed)
        for layer, (k, v) in zip(self.layers, ctx_kv):
            x = layer(x, block_positions, k, v, mask)
        b, m = anchors.shape
        s = self.cfg.block_size
        if self.cfg.style == "dflash":  # the anchor's slot drafts nothing
            x = x.view(b, m, s, -1)[:, :, 1:]
        h = self.norm(x)
        if head is None:
            logits = self.lm_head(h.to(self.lm_head.weight.dtype))
        else:  # a callable head casts for itself
            logits = head(h) if callable(head) else F.linear(h.to(head[0].dtype), head[0], head[1])
        return logits.reshape(b, m, self.cfg.depth, -1)
