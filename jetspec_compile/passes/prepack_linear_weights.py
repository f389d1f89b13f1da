"""prepack_linear_weights: run the step's fp32 linears on CPU from packed or exactly compact weights.

Expects a step whose linears are ``aten.linear`` on ``get_attr`` weights. Afterwards every fp32 CPU linear whose
row count (``B*N``) lies in ``[MIN_ROWS, MAX_ROWS]`` calls a packed GEMM (:mod:`jetspec_compile.kernels.cpu_linear`:
MKL or oneDNN per weight shape, as ``cpu_linear`` says) on a weight packed once for that row count and shared by
every graph of the model; other linears and graphs are left untouched. Before that, with ``compact`` on
(``"auto"``), a linear of up to ``MAX_ROWS`` rows (one row included) whose weight has an exact compact form
(:mod:`jetspec_compile.kernels.compact_linear`) calls that form's kernel instead. This is what Inductor's CPU weight
prepacking does under ``freezing``, here for the eager backend without a compile. A lowering pass of the eager
backend: exported graphs (AOTI, ONNX) cannot carry the opaque packed tensors.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..kernels.compact_linear import compact_setting, compact_weight
from ..kernels.cpu_linear import MAX_ROWS, MIN_ROWS, kernel_setting, packed_weight, prepack_supported
from .manager import PassResult
from .patterns import val

__all__ = ["prepack_linear_weights", "prepack_supported"]


def prepack_linear_weights(step, kernel: str | None = None, compact: str | None = None) -> PassResult:
    setting = kernel_setting(kernel)  # read once per graph, never per call
    compact = compact_setting(compact)
    gm = step.graph_module
    if not prepack_supported():
        return PassResult(False, {"skipped": "this PyTorch build has neither MKL nor oneDNN"})
    packed_by_weight: dict[str, str] = {}  # weight attr -> packed attr (a tied weight is packed once)
    kernels = {"mkl": 0, "onednn": 0, "compact": 0}
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
        form = compact_weight(w, compact) if rows <= MAX_ROWS else None
        if form is not None:
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(form.op(), (x, *register_compact(gm, weight.target, form), bias))
            kernels["compact"] += 1
        elif not MIN_ROWS <= rows <= MAX_ROWS:
            continue
        else:
            fused = _packed_call(gm, node, x, weight, bias, rows, w, setting, packed_by_weight, kernels)
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        rewritten += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(rewritten > 0, {"linears_prepacked": rewritten, "weights_packed": len(packed_by_weight),
                                      "mkl_linears": kernels["mkl"], "onednn_linears": kernels["onednn"],
                                      "compact_linears": kernels["compact"]})


def register_compact(gm: fx.GraphModule, weight_name: str, form) -> list[fx.Node]:
    """``get_attr`` nodes of ``form``'s tensors, registered on ``gm`` once per weight (a tied weight shares them)."""
    base = "_jetspec_compact_" + weight_name.replace(".", "_")
    nodes = []
    for i, tensor in enumerate(form.tensors()):
        name = f"{base}_{i}"
        if not hasattr(gm, name):
            gm.register_buffer(name, tensor, persistent=False)
        nodes.append(gm.graph.get_attr(name))
    return nodes


def _packed_call(gm, node, x, weight, bias, rows, w, setting, packed_by_weight, kernels) -> fx.Node:
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
    return fused
