"""prepack_linear_weights: run the step's fp32 linears on CPU from packed weights (MKL or oneDNN).

Expects a step whose linears are ``aten.linear`` on ``get_attr`` weights. Afterwards every fp32 CPU linear whose
row count (``B*N``) lies in ``[MIN_ROWS, MAX_ROWS]`` calls a packed GEMM (:mod:`jetspec_compile.kernels.cpu_linear`:
MKL or oneDNN per weight shape, as ``cpu_linear`` says) on a weight packed once for that row count and shared by
every graph of the model; other linears and graphs are left untouched. This is what Inductor's CPU weight
prepacking does under ``freezing``, here for the eager backend without a compile. A lowering pass of the eager
backend: exported graphs (AOTI, ONNX) cannot carry the opaque packed tensors.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..kernels.cpu_linear import MAX_ROWS, MIN_ROWS, kernel_setting, packed_weight, prepack_supported
from .manager import PassResult
from .patterns import val

__all__ = ["prepack_linear_weights", "prepack_supported"]


def prepack_linear_weights(step, kernel: str | None = None) -> PassResult:
    setting = kernel_setting(kernel)  # read once per graph, never per call
    gm = step.graph_module
    if not prepack_supported():
        return PassResult(False, {"skipped": "this PyTorch build has neither MKL nor oneDNN"})
    packed_by_weight: dict[str, str] = {}  # weight attr -> packed attr (a tied weight is packed once)
    kernels = {"mkl": 0, "onednn": 0}
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
        w = operator.attrgetter(weight.target)(gm)
        xv = val(x)
        if xv is None or w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 2:
            continue
        rows = 1
        for size in xv.shape[:-1]:
            rows *= int(size)
        if not MIN_ROWS <= rows <= MAX_ROWS:
            continue
        kernel, packed = packed_weight(w, rows, setting)
        name = packed_by_weight.get(weight.target)
        if name is None:
            name = f"_jetspec_packed_{len(packed_by_weight)}"
            gm.register_buffer(name, packed, persistent=False)
            packed_by_weight[weight.target] = name
        with gm.graph.inserting_before(node):
            packed = gm.graph.get_attr(name)
            if kernel == "mkl":
                fused = gm.graph.call_function(torch.ops.mkl._mkl_linear.default, (x, packed, weight, bias, rows))
            else:
                fused = gm.graph.call_function(torch.ops.mkldnn._linear_pointwise.default,
                                               (x, packed, bias, "none", [], ""))
        kernels[kernel] += 1
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        rewritten += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(rewritten > 0, {"linears_prepacked": rewritten, "weights_packed": len(packed_by_weight),
                                      "mkl_linears": kernels["mkl"], "onednn_linears": kernels["onednn"]})
