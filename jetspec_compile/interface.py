"""The verify step's interface: the one description of what a rewritten graph takes and returns.

The passes add the inputs named here, the runtime feeds them, and every backend (eager, Inductor, AOTInductor,
ONNX Runtime, TensorRT) exports, marks dynamic and calls the graph through this description; no other module
spells an input name. A verify step over ``B`` rows, ``N`` tree nodes and a cache of ``L`` slots takes:

===================  ======================  =======================================================
name                 shape, dtype            meaning
===================  ======================  =======================================================
``input_ids``        ``[B, N]`` int64        node tokens (node 0: the pending root)
``base_position``    ``[B]`` int64           position of the root (committed length, per row)
``depth``            ``[B, N]`` int64        node depth; position = base_position + depth
``write_slots``      ``[N]`` int64           cache slots the nodes' keys/values are written to
``tree_mask``        ``[B, N, N]`` bool      node i sees node j (ancestors and itself)
``cache_valid``      ``[B, L]`` bool         cache slots holding committed tokens
``cache_positions``  ``[B, L]`` int64        positions of those tokens
``k_cache_l``        ``[B, H_kv, L, D]``     layer ``l``'s keys (``v_cache_l``: values), written in place
===================  ======================  =======================================================

and returns ``logits [B, N, V]`` (``head_input [B, N, H]``, the LM head's input, where a lowering left the head
to the runtime) and ``hidden [B, N, K*H]`` (the tapped layers), plus, for a graph whose cache
writes were made functional for export, ``k_new_l`` / ``v_new_l [B, H_kv, N, D]`` per layer. ``L`` is the only
dynamic dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["INPUT_IDS", "BASE_POSITION", "DEPTH", "WRITE_SLOTS", "TREE_MASK", "CACHE_VALID", "CACHE_POSITIONS",
           "LOGITS", "HEAD_INPUT", "HIDDEN", "cache_name", "new_kv_name", "KVLayout", "VerifyInterface"]

INPUT_IDS = "input_ids"
BASE_POSITION = "base_position"
DEPTH = "depth"
WRITE_SLOTS = "write_slots"
TREE_MASK = "tree_mask"
CACHE_VALID = "cache_valid"
CACHE_POSITIONS = "cache_positions"
LOGITS = "logits"
HEAD_INPUT = "head_input"
HIDDEN = "hidden"

#: the inputs before the per-layer caches, in graph order
STEP_INPUTS = (INPUT_IDS, BASE_POSITION, DEPTH, WRITE_SLOTS, TREE_MASK, CACHE_VALID, CACHE_POSITIONS)
#: the cache-length axis of the inputs that have one, besides the caches (axis 2)
_LENGTH_DIMS = {CACHE_VALID: 1, CACHE_POSITIONS: 1}


def cache_name(kind: str, layer: int) -> str:
    """Name of layer ``layer``'s key (``kind="k"``) or value (``"v"``) cache input."""
    return f"{kind}_cache_{layer}"


def new_kv_name(kind: str, layer: int) -> str:
    """Name of layer ``layer``'s new keys/values output of a functional (exported) step."""
    return f"{kind}_new_{layer}"


@dataclass(frozen=True)
class KVLayout:
    """The static KV cache of a verify step: per layer one ``[B, heads, L, head_dim]`` key and value tensor."""

    num_layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    def cache_names(self) -> list[str]:
        """``k_cache_0, v_cache_0, k_cache_1, ...``: the graph's cache inputs, in order."""
        return [cache_name(kind, layer) for layer in range(self.num_layers) for kind in "kv"]

    def new_kv_names(self) -> list[str]:
        return [new_kv_name(kind, layer) for layer in range(self.num_layers) for kind in "kv"]

    def to_json(self) -> dict:
        return {"num_layers": self.num_layers, "heads": self.heads, "head_dim": self.head_dim,
                "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_json(cls, data: dict) -> "KVLayout":
        return cls(int(data["num_layers"]), int(data["heads"]), int(data["head_dim"]),
                   getattr(torch, str(data["dtype"]).removeprefix("torch.")))


@dataclass(frozen=True)
class VerifyInterface:
    """Inputs, outputs and dynamic dimension of one rewritten verify step (see the module docstring).

    Attributes:
        batch_size, budget: the static ``B`` and ``N``.
        kv: the cache layout.
        tap_layers: the decoder layers whose outputs ``hidden`` concatenates.
        functional_kv: the step returns its new keys/values instead of writing the caches (exports).
        split_head: the step returns the LM head's input instead of the logits (``split_lm_head``).
    """

    batch_size: int
    budget: int
    kv: KVLayout
    tap_layers: tuple[int, ...]
    functional_kv: bool = False
    split_head: bool = False

    @property
    def input_names(self) -> list[str]:
        return [*STEP_INPUTS, *self.kv.cache_names()]

    @property
    def output_names(self) -> list[str]:
        first = HEAD_INPUT if self.split_head else LOGITS
        return [first, HIDDEN, *(self.kv.new_kv_names() if self.functional_kv else [])]

    @staticmethod
    def length_dim(name: str) -> int | None:
        """The cache-length axis of input ``name`` (the one dynamic dimension), or None."""
        return 2 if name.startswith(("k_cache_", "v_cache_")) else _LENGTH_DIMS.get(name)

    def dynamic_shapes(self, length) -> dict[str, dict[int, object] | None]:
        """``torch.export`` / ``torch.onnx.export`` dynamic shapes: ``length`` (a ``Dim``) on every cache axis."""
        return {name: (None if self.length_dim(name) is None else {self.length_dim(name): length})
                for name in self.input_names}

    @staticmethod
    def feed(*, input_ids: torch.Tensor, base_position: torch.Tensor, depth: torch.Tensor,
             write_slots: torch.Tensor, tree_mask: torch.Tensor, cache_valid: torch.Tensor,
             cache_positions: torch.Tensor, caches: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The graph's keyword inputs; ``caches``: ``k_0, v_0, k_1, v_1, ...`` (``StaticKVCache.views``)."""
        inputs = {INPUT_IDS: input_ids, BASE_POSITION: base_position, DEPTH: depth, WRITE_SLOTS: write_slots,
                  TREE_MASK: tree_mask, CACHE_VALID: cache_valid, CACHE_POSITIONS: cache_positions}
        for i, cache in enumerate(caches):
            inputs[cache_name("kv"[i % 2], i // 2)] = cache
        return inputs

    def example_inputs(self, length: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Inputs of a chain over an empty cache of ``length`` slots (for tracing and exporting)."""
        b, n, kv = self.batch_size, self.budget, self.kv
        cache = lambda: torch.zeros(b, kv.heads, length, kv.head_dim, dtype=kv.dtype, device=device)  # noqa: E731
        return self.feed(
            input_ids=torch.zeros(b, n, dtype=torch.long, device=device),
            base_position=torch.zeros(b, dtype=torch.long, device=device),
            depth=torch.arange(n, device=device).expand(b, n).contiguous(),
            write_slots=torch.arange(n, device=device),
            tree_mask=torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(b, n, n).contiguous(),
            cache_valid=torch.zeros(b, length, dtype=torch.bool, device=device),
            cache_positions=torch.zeros(b, length, dtype=torch.long, device=device),
            caches=[cache() for _ in range(2 * kv.num_layers)])

    def write_new_kv(self, inputs: dict, new_kv: Sequence) -> None:
        """Write a functional step's new keys/values (tensors or numpy arrays, ``k_new_0, v_new_0, ...``) into
        the caches it was given, at ``write_slots``: what the eager graph's in-place writes do."""
        slots = inputs[WRITE_SLOTS]
        for name, new in zip(self.kv.cache_names(), new_kv):
            cache = inputs[name]
            new = new if isinstance(new, torch.Tensor) else torch.from_numpy(new)
            cache.index_copy_(2, slots, new.to(cache.device, cache.dtype))

    def to_json(self) -> dict:
        return {"batch_size": self.batch_size, "budget": self.budget, "kv": self.kv.to_json(),
                "tap_layers": list(self.tap_layers), "functional_kv": self.functional_kv,
                "inputs": self.input_names, "outputs": self.output_names}

    @classmethod
    def from_json(cls, data: dict) -> "VerifyInterface":
        return cls(int(data["batch_size"]), int(data["budget"]), KVLayout.from_json(data["kv"]),
                   tuple(int(i) for i in data["tap_layers"]), bool(data.get("functional_kv", False)))
