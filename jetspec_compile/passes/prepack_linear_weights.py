"""prepack_linear_weights: run the step's fp32 linears on CPU from MKL-packed weights.

A tree-verify step multiplies a handful of rows (``B*N``, typically 4..32) by every weight of the model. On CPU,
plain ``aten.linear`` with a few rows goes through a GEMM that re-packs the weight matrix on every call, which
costs about as much as reading it: on a 2-core Xeon, verifying 8 nodes of SmolLM2-135M spent 1.6x the matmul
time of one decoding token (``benchmarks/bench_verify.py``). This pass packs each weight once, for the graph's
static row count, into MKL's GEMM layout (``torch.ops.mkl._mkl_reorder_linear_weight``) and calls
``torch.ops.mkl._mkl_linear`` instead — what Inductor's CPU weight prepacking does under ``freezing``, here for
the eager backend without a compile. The pass only runs where it pays (fp32 CPU weights, MKL built in,
``B*N <= MAX_ROWS``) and leaves other graphs untouched.

Memory: one packed copy per weight, shared by every graph of the model (each tree budget). ``_mkl_linear`` takes
the row count the weight was packed for; MKL's packed B layout does not depend on it in practice, but that is not
a documented promise, so a packed copy is reused for another row count only after one multiplication at that
count matched the plain weight (else the weight is packed again for it).

A lowering pass of the eager backend only: exported graphs (AOTI, ONNX) cannot carry the opaque packed tensors,
and Inductor packs for itself.
"""

from __future__ import annotations

import weakref

import torch
from torch import fx

from .manager import PassResult
from .patterns import val

__all__ = ["prepack_linear_weights", "MAX_ROWS", "prepack_supported"]

#: largest row count (batch x tree nodes) whose linears are packed; above it MKL's GEMM packs cheaply enough
MAX_ROWS = 64


def prepack_supported() -> bool:
    """Whether this PyTorch build can run MKL-packed linears (an x86 build with MKL)."""
    return bool(getattr(torch._C, "has_mkl", False)) and hasattr(torch.ops.mkl, "_mkl_linear")


#: id(weight) -> (weak reference, its version counter, {row count: packed}) — shared by every graph of a model,
#: dropped with the weight (tensors compare elementwise, so they cannot key a WeakKeyDictionary)
_PACKED: dict[int, tuple[weakref.ref, int, dict[int, torch.Tensor]]] = {}


def _packed(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` packed for ``rows``-row products: a copy packed earlier (for another row count) if it computes
    the same at ``rows``, else a new one."""
    ref, version, by_rows = _PACKED.get(id(weight), (None, None, {}))
    if ref is None or ref() is not weight or version != weight._version:  # new, or changed in place since
        by_rows = {}
        if ref is None or ref() is not weight:
            weakref.finalize(weight, _PACKED.pop, id(weight), None)
        _PACKED[id(weight)] = (weakref.ref(weight), weight._version, by_rows)
    if rows in by_rows:
        return by_rows[rows]
    w = weight.detach()
    with torch.no_grad():
        x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(rows), dtype=w.dtype)
        expected = x @ w.t()
        tol = 1e-4 * float(expected.abs().max().clamp(min=1))
        for packed in dict.fromkeys(by_rows.values()):
            if torch.allclose(torch.ops.mkl._mkl_linear(x, packed, w, None, rows), expected, rtol=0, atol=tol):
                by_rows[rows] = packed
                return packed
        by_rows[rows] = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    return by_rows[rows]


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def prepack_linear_weights(step) -> PassResult:
    gm = step.graph_module
    if not prepack_supported():
        return PassResult(False, {"skipped": "this PyTorch build has no MKL"})
    packed_by_weight: dict[str, str] = {}  # weight attr -> packed attr (a tied weight is packed once)
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        x, weight = node.args[:2]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            continue
        if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
            continue
        w = _attr(gm, weight.target)
        xv = val(x)
        if xv is None or w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 2:
            continue
        rows = 1
        for size in xv.shape[:-1]:
            rows *= int(size)
        if not 1 <= rows <= MAX_ROWS:
            continue
        name = packed_by_weight.get(weight.target)
        if name is None:
            name = f"_jetspec_packed_{len(packed_by_weight)}"
            gm.register_buffer(name, _packed(w, rows), persistent=False)
            packed_by_weight[weight.target] = name
        with gm.graph.inserting_before(node):
            packed = gm.graph.get_attr(name)
            fused = gm.graph.call_function(torch.ops.mkl._mkl_linear.default, (x, packed, weight, bias, rows))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        rewritten += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(rewritten > 0, {"linears_prepacked": rewritten, "weights_packed": len(packed_by_weight)})
