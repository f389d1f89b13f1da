"""insert_kv_cache: give every attention a static, preallocated KV cache written at explicit slots.

Expects a graph whose attention ops (``aten.scaled_dot_product_attention``) attend over the step's own ``N``
tokens. For each decoder layer ``l`` it adds inputs ``k_cache_l`` / ``v_cache_l`` ``[B, H_kv, L, D]`` and one
shared ``write_slots`` ``[N]`` input; the layer's new keys/values (found by walking back from the attention's
key/value through view-only ops such as grouped-query ``repeat_kv``, so the cache holds ``H_kv`` heads) are
written in place with ``index_copy_`` at ``write_slots``, and attention then reads the whole cache (repeated to
the query's head count when ``H_kv < H``). The cache length ``L`` is not baked into the graph: callers may pass
views of the first ``L' <= L`` slots. Records the cache layout in ``step.kv``.
"""

from __future__ import annotations

import torch
from torch import fx

from ..errors import UnsupportedModelError
from ..interface import WRITE_SLOTS, KVLayout, cache_name
from .manager import PassResult
from .patterns import VIEW_OPS, add_placeholders, attention_by_layer, val

aten = torch.ops.aten


def _source(node: fx.Node, batch: int, n: int) -> fx.Node:
    """Walk back from an attention key/value through view-only ops to the per-step ``[B, h, N, D]`` tensor."""
    best = node
    cur = node
    while isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in VIEW_OPS:
        cur = cur.args[0]
        v = val(cur)
        if v is not None and v.dim() == 4 and v.shape[0] == batch and v.shape[2] == n:
            best = cur
    return best


def insert_kv_cache(step) -> PassResult:
    gm = step.graph_module
    batch, n = step.batch_size, step.budget
    by_layer = attention_by_layer(gm, step.layers_path, step.num_layers)
    (write_slots,) = add_placeholders(gm, [WRITE_SLOTS])
    layout = []
    for layer in range(step.num_layers):
        attn = by_layer[layer]
        q, k, v = attn.args[:3]
        heads = val(q).shape[1]
        k_cache, v_cache = add_placeholders(gm, [cache_name("k", layer), cache_name("v", layer)])
        new_kv = []
        for arg, cache in ((k, k_cache), (v, v_cache)):
            src = _source(arg, batch, n)
            sv = val(src)
            if sv is None or sv.dim() != 4 or sv.shape[2] != n or heads % sv.shape[1] != 0:
                raise UnsupportedModelError(
                    f"layer {layer}: could not find the per-step key/value of attention {attn.name} "
                    f"(expected [B, H_kv, {n}, D] with H_kv dividing {heads}, got {getattr(sv, 'shape', None)})"
                )
            with gm.graph.inserting_before(attn):
                full = gm.graph.call_function(aten.index_copy_.default, (cache, 2, write_slots, src))
                full.meta["jetspec"] = "kv_cache_write"
                if sv.shape[1] != heads:
                    full = gm.graph.call_function(
                        aten.repeat_interleave.self_int, (full, heads // sv.shape[1], 1)
                    )
                    full.meta["jetspec"] = "kv_repeat"
            new_kv.append(full)
            layout.append((tuple(sv.shape[1:2]) + tuple(sv.shape[3:]), sv.dtype))
        kwargs = dict(attn.kwargs)
        kwargs.pop("enable_gqa", None)
        attn.args = (q, new_kv[0], new_kv[1]) + tuple(attn.args[3:])
        attn.kwargs = kwargs
    shapes = {shape for shape, _ in layout}
    if len(shapes) != 1:
        raise UnsupportedModelError(f"layers have different KV shapes {sorted(shapes)}; a uniform cache is required")
    (heads_kv, head_dim), dtype = layout[0]
    step.kv = KVLayout(step.num_layers, heads_kv, head_dim, dtype)
    return PassResult(True, {"kv_caches_inserted": step.num_layers})
