"""insert_tree_alibi: ALiBi biases from each key's real position, not its slot in the flat sequence.

Expects the graph after :func:`insert_tree_mask` and the slopes :func:`match_attention_bias` recorded in
``step.alibi_slopes``. The tree mask replaced each attention's mask, ALiBi bias included; for every
layer with slopes this adds ``slope_h · key_position`` back onto that layer's mask, where a cache slot's key
position is its committed position (``cache_positions``) and a tree node's is its tree position (committed
length + depth): the bias a node sees is what the model gives the same token sequence along the node's own
root-to-node path. Graphs without ALiBi layers are left as they are.
"""

from __future__ import annotations

import torch

from ..interface import CACHE_POSITIONS, WRITE_SLOTS
from .manager import PassResult
from .patterns import attention_by_layer, placeholder, tree_positions, val

aten = torch.ops.aten


def tree_alibi_bias(slopes: torch.Tensor, cache_positions: torch.Tensor, write_slots: torch.Tensor,
                    positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias ``[B, H, 1, L]``: ``slopes[h] · key_position[b, l]``.

    slopes: [H] float; cache_positions: [B, L] int64; write_slots: [N] int64; positions: [B, N] int64.
    """
    key_positions = cache_positions.index_copy(1, write_slots, positions)  # [B, L]
    bias = slopes.to(torch.float32)[None, :, None] * key_positions[:, None, :].to(torch.float32)  # [B, H, L]
    return bias[:, :, None, :].to(dtype)


def insert_tree_alibi(step) -> PassResult:
    gm = step.graph_module
    slopes = step.alibi_slopes
    if not slopes:
        return PassResult(False, {"alibi_layers": 0})
    by_layer = attention_by_layer(gm, step.layers_path, step.num_layers)
    positions = tree_positions(gm)
    write_slots, cache_positions = placeholder(gm, WRITE_SLOTS), placeholder(gm, CACHE_POSITIONS)
    biases = {}
    for layer, layer_slopes in sorted(slopes.items()):
        attn = by_layer[layer]
        mask, query = attn.kwargs["attn_mask"], val(attn.args[0])
        key = tuple(layer_slopes.tolist())
        if key not in biases:  # layers with the same slopes share one bias
            name = f"jetspec_alibi_slopes_{layer}"
            gm.register_buffer(name, layer_slopes.to(query.device))
            with gm.graph.inserting_before(attn):
                buffer = gm.graph.get_attr(name)
                bias = gm.graph.call_function(
                    tree_alibi_bias, (buffer, cache_positions, write_slots, positions, query.dtype))
            bias.meta["jetspec"] = f"tree_alibi_{layer}"
            biases[key] = bias
        with gm.graph.inserting_before(attn):
            biased = gm.graph.call_function(aten.add.Tensor, (mask, biases[key]))
        attn.kwargs = {**attn.kwargs, "attn_mask": biased}
    return PassResult(True, {"alibi_layers": len(slopes), "alibi_biases_built": len(biases)})
