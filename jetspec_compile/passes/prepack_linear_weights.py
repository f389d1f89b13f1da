"""prepack_linear_weights: run the step's fp32 linears on CPU from MKL-packed weights.

A tree-verify step multiplies a handful of rows (``B*N``, typically 4..32) by every weight of the model. On CPU,
plain ``aten.linear`` with a few rows goes through a GEMM that re-packs the weight matrix on every call, which
costs about as much as reading it: on a 2-core Xeon, verifying 8 nodes of SmolLM2-135M spent 1.6x the matmul
time of one decoding token (``benchmarks/bench_verify.py``). This pass packs each weight once, for the graph's
static row count, into MKL's GEMM layout (``torch.ops.mkl._mkl_reorder_linear_weight``) and calls
``torch.ops.mkl._mkl_linear`` instead — what Inductor's CPU weight prepacking does under ``freezing``, here for
the eager backend without a compile. The pass only runs where it pays (fp32 CPU weights, MKL built in,
``MIN_ROWS <= B*N <= MAX_ROWS``) and leaves other graphs untouched.

Memory: one packed copy of the weights per row count, shared by the graphs of that count (each tree budget in
``[MIN_ROWS, MAX_ROWS]``: one copy for a fixed budget, four for ``budget="auto"``). A copy packed for one row
count computes correctly at another, but at the speed of the plain weight (measured: verifying 8 nodes from
weights packed for 1 row took as long as unpacked), so copies are not shared across counts. A single row (plain
decoding) is left to MKL's GEMV, which reads the weight at full speed unpacked.

A lowering pass of the eager backend only: exported graphs (AOTI, ONNX) cannot carry the opaque packed tensors,
and Inductor packs for itself. Modules outside a graph (the drafter's step) get the same from
:func:`with_packed_linears`, whose linears pack per row count on first use (:func:`packed_linear`).
"""

from __future__ import annotations

import copy
import operator
import weakref

import torch
from torch import fx, nn

from .manager import PassResult
from .patterns import val

__all__ = ["prepack_linear_weights", "MIN_ROWS", "MAX_ROWS", "packed_linear", "prepack_supported",
           "with_packed_linears"]

#: row counts (batch x tree nodes) whose linears are packed: one row is a GEMV (no packing to save), and above
#: MAX_ROWS the GEMM's own packing is amortised (the 64-token prefill chunk runs once per prompt)
MIN_ROWS, MAX_ROWS = 2, 32


def prepack_supported() -> bool:
    """Whether this PyTorch build can run MKL-packed linears (an x86 build with MKL)."""
    return bool(getattr(torch._C, "has_mkl", False)) and hasattr(torch.ops.mkl, "_mkl_linear")


#: id(weight) -> (weak reference, its version counter, {row count: packed}) — shared by every graph of a model,
#: dropped with the weight (tensors compare elementwise, so they cannot key a WeakKeyDictionary)
_PACKED: dict[int, tuple[weakref.ref, int, dict[int, torch.Tensor]]] = {}


def _packed(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` packed for ``rows``-row products, shared by every graph of that row count."""
    ref, version, by_rows = _PACKED.get(id(weight), (None, None, {}))
    known = ref is not None and ref() is weight  # an id can be reused by a later tensor
    if not known:
        weakref.finalize(weight, _PACKED.pop, id(weight), None)
    if not known or version != weight._version:  # new, or changed in place since it was packed
        by_rows = {}
        _PACKED[id(weight)] = (weakref.ref(weight), weight._version, by_rows)
    if rows not in by_rows:
        with torch.no_grad():
            by_rows[rows] = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
    return by_rows[rows]


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, from ``weight`` packed for this row count where that pays (fp32 on CPU,
    ``MIN_ROWS <= rows <= MAX_ROWS``, no autograd, an MKL build); plain ``F.linear`` otherwise."""
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    if (MIN_ROWS <= rows <= MAX_ROWS and x.dtype == weight.dtype == torch.float32 and weight.device.type == "cpu"
            and x.device.type == "cpu" and not torch.is_grad_enabled() and prepack_supported()):
        out = torch.ops.mkl._mkl_linear(x.reshape(rows, x.shape[-1]), _packed(weight, rows), weight, bias, rows)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight, bias)


class PackedLinear(nn.Module):
    """An ``nn.Linear``'s parameters (shared, not copied) run through :func:`packed_linear`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias)


def with_packed_linears(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` that shares every parameter and buffer, with each ``nn.Linear`` replaced
    by a :class:`PackedLinear` (for eager inference on CPU; ``module`` itself is left as it is)."""
    if isinstance(module, nn.Linear):
        return PackedLinear(module)
    clone = copy.copy(module)  # shallow: the parameter and buffer dicts are the same objects
    clone._modules = {name: None if child is None else with_packed_linears(child)
                      for name, child in module._modules.items()}
    return clone


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
        w = operator.attrgetter(weight.target)(gm)
        xv = val(x)
        if xv is None or w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 2:
            continue
        rows = 1
        for size in xv.shape[:-1]:
            rows *= int(size)
        if not MIN_ROWS <= rows <= MAX_ROWS:
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
