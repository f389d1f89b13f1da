"""insert_tree_mask: every attention sees the committed prefix plus the node's own ancestors, nothing else.

Expects the graph after :func:`insert_tree_positions` and :func:`insert_kv_cache` (it reads the
``tree_positions`` node and the ``write_slots`` input). Adds inputs ``tree_mask`` ``[B, N, N]`` (bool ancestor
matrix, see :func:`jetspec_compile.tree.ancestor_mask`), ``cache_valid`` ``[B, L]`` (committed, non-padding
slots) and ``cache_positions`` ``[B, L]`` (position id of each committed slot). One additive float mask
``[B, 1, N, L]`` is built per distinct attention window and replaces the mask of every attention op
(``is_causal`` is cleared); sliding-window layers also hide keys whose position is ``>= window`` behind the
query's tree position. Afterwards no attention keeps the model's causal-only mask.

Family differences live in :func:`attention_windows`, a short table read from the config; an unknown layer
type raises instead of falling back to full attention.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from ..interface import CACHE_POSITIONS, CACHE_VALID, TREE_MASK, WRITE_SLOTS
from ..tree import tree_attention_mask
from .manager import PassResult
from .patterns import add_placeholders, attention_by_layer, placeholder, tree_positions, val

aten = torch.ops.aten

#: HF ``config.layer_types`` values and whether the layer uses ``config.sliding_window``
LAYER_TYPES = {"full_attention": False, "sliding_attention": True}


def attention_windows(config, num_layers: int) -> list[int | None]:
    """Sliding window of each decoder layer (None = full attention).

    * ``config.layer_types`` (Gemma2/3, Qwen2/3, Cohere2, ...): per-layer ``full_attention`` /
      ``sliding_attention``; the latter uses ``config.sliding_window``.
    * otherwise ``config.sliding_window`` applies to every layer when set (Mistral, Mixtral, Phi-3).
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * num_layers
    if len(layer_types) != num_layers:
        raise UnsupportedModelError(f"config.layer_types has {len(layer_types)} entries for {num_layers} layers")
    out = []
    for i, kind in enumerate(layer_types):
        if kind not in LAYER_TYPES:
            raise UnsupportedModelError(
                f"layer {i} has attention type {kind!r}; tree masks are defined for {sorted(LAYER_TYPES)} only"
            )
        if LAYER_TYPES[kind] and window is None:
            raise UnsupportedModelError(f"layer {i} is sliding_attention but config.sliding_window is None")
        out.append(window if LAYER_TYPES[kind] else None)
    return out


def insert_tree_mask(step) -> PassResult:
    gm = step.graph_module
    by_layer = attention_by_layer(gm, step.layers_path, step.num_layers)
    windows = attention_windows(step.config, step.num_layers)
    positions = tree_positions(gm)
    write_slots = placeholder(gm, WRITE_SLOTS)
    tree_mask, cache_valid, cache_positions = add_placeholders(gm, [TREE_MASK, CACHE_VALID, CACHE_POSITIONS])
    first_attn = by_layer[min(by_layer)]
    dtype = val(first_attn.args[0]).dtype
    masks = {}
    for window in sorted(set(windows), key=lambda w: -1 if w is None else w):
        with gm.graph.inserting_before(first_attn):
            node = gm.graph.call_function(
                tree_attention_mask,
                (tree_mask, cache_valid, cache_positions, write_slots, positions, window, dtype),
            )
        node.meta["jetspec"] = "tree_mask" if window is None else f"tree_mask_window_{window}"
        masks[window] = node
    for layer, attn in by_layer.items():
        q, k, v = attn.args[:3]
        kwargs = {key: value for key, value in attn.kwargs.items() if key in ("scale", "softcap")}
        attn.args = (q, k, v)
        attn.kwargs = {"attn_mask": masks[windows[layer]], "dropout_p": 0.0, "is_causal": False, **kwargs}
        attn.meta["jetspec"] = "tree_attention"
    step.windows = tuple(windows)
    return PassResult(True, {"attention_rewritten": len(by_layer), "masks_built": len(masks)})
