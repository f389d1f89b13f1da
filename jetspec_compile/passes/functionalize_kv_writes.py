"""functionalize_kv_writes: make the verify graph pure for export (ONNX, TensorRT).

Expects the graph after :func:`insert_kv_cache`, whose cache writes are in-place ``index_copy_`` on the cache
inputs. Afterwards every write is an out-of-place ``index_copy`` (attention reads the written copy) and the
graph's output gains, after ``(logits, hidden)``, the new keys/values of the step, ``k_new_0, v_new_0, ...``
(each ``[B, H_kv, N, D]``), which the caller writes into its own cache at ``write_slots``. Exported graphs
then have no input mutation and only ``N``-sized extra outputs instead of whole caches.
"""

from __future__ import annotations

import torch

from .manager import PassResult
from .patterns import output_values

aten = torch.ops.aten


def functionalize_kv_writes(step) -> PassResult:
    gm = step.graph_module
    writes = [n for n in gm.graph.nodes if n.meta.get("jetspec") == "kv_cache_write"]
    if not writes:
        raise ValueError("graph has no KV cache writes: run insert_kv_cache first")
    new_kv = []
    for node in writes:
        node.target = aten.index_copy.default
        new_kv.append(node.args[3])
    out, values = output_values(gm)
    out.args = (tuple(values) + tuple(new_kv),)
    step.functional_kv = True
    return PassResult(True, {"writes_functionalized": len(writes)})
