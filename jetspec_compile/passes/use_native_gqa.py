"""use_native_gqa: let attention read grouped KV heads directly instead of a repeated copy of the cache.

Expects the graph after :func:`insert_kv_cache`, where grouped-query layers feed attention
``repeat_interleave(cache, H / H_kv, dim=1)`` (tagged ``kv_repeat``): a copy of the whole cache view per layer
per step. Afterwards those attentions take the ``[B, H_kv, L, D]`` cache and ``enable_gqa=True``; the repeat
nodes are gone. A lowering pass for the PyTorch backends (eager, Inductor); exported graphs keep the explicit
repeat, which every ONNX consumer understands.
"""

from __future__ import annotations

from .manager import PassResult
from .patterns import find_attention_nodes


def use_native_gqa(step) -> PassResult:
    gm = step.graph_module
    rewritten = 0
    for attn in find_attention_nodes(gm):
        q, k, v = attn.args[:3]
        if all(getattr(x, "meta", {}).get("jetspec") == "kv_repeat" for x in (k, v)):
            attn.args = (q, k.args[0], v.args[0]) + tuple(attn.args[3:])
            attn.kwargs = {**attn.kwargs, "enable_gqa": True}
            rewritten += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(rewritten > 0, {"attention_native_gqa": rewritten})
