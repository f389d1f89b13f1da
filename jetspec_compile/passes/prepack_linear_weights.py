"""prepack_linear_weights: run the step's fp32 linears on CPU from packed weights (MKL or oneDNN).

A tree-verify step multiplies a handful of rows (``B*N``, typically 4..32) by every weight of the model. On CPU,
plain ``aten.linear`` with a few rows goes through a GEMM that re-packs the weight matrix on every call, which
costs about as much as reading it: on a 2-core Xeon, verifying 8 nodes of SmolLM2-135M spent 1.6x the matmul
time of one decoding token (``benchmarks/bench_verify.py``). This pass packs each weight once, for the graph's
static row count, and calls the packed GEMM instead — what Inductor's CPU weight prepacking does under
``freezing``, here for the eager backend without a compile. The pass only runs where it pays (fp32 CPU weights,
``MIN_ROWS <= B*N <= MAX_ROWS``) and leaves other graphs untouched.

Two packed kernels exist, and which is faster depends on the CPU (:func:`choose_kernel`):

* ``"mkl"``: ``torch.ops.mkl._mkl_linear`` from ``mkl._mkl_reorder_linear_weight`` (what Inductor picks for fp32);
* ``"onednn"``: ``torch.ops.mkldnn._linear_pointwise`` from ``mkldnn._reorder_linear_weight``.

MKL's small-row GEMMs are fast on Intel CPUs and slow on others. On this project's AMD EPYC (Zen 4) machine, 8
rows against SmolLM2's 49152×576 LM head took 18.7 ms with MKL and 6.5 ms with oneDNN, and an 8-node verify
forward of the Inductor backend 97 ms against 42 ms. ``"auto"`` (the default; the environment variable
``JETSPEC_CPU_LINEAR`` sets another) times both once per weight shape and row count in the process (a few ms per
shape, about 0.5 s for an LM head) and takes the faster. Both compute in fp32; only the summation order differs,
as between any two GEMMs.

Memory: one packed copy of the weights per row count, shared by the graphs of that count (each tree budget in
``[MIN_ROWS, MAX_ROWS]``: one copy for a fixed budget, four for ``budget="auto"``). A copy packed for one row
count computes correctly at another, but at the speed of the plain weight (measured: verifying 8 nodes from
weights packed for 1 row took as long as unpacked), so copies are not shared across counts. A single row (plain
decoding) is left to the GEMV, which reads the weight at full speed unpacked.

A lowering pass of the eager backend. Inductor packs for itself and :class:`~jetspec_compile.backends.inductor.
PackedLinearPass` applies the same kernel choice there; exported graphs (AOTI, ONNX) cannot carry the opaque
packed tensors. Modules outside a graph (the drafter's step) get the same from :func:`with_packed_linears`, whose
linears pack per row count on first use (:func:`packed_linear`).
"""

from __future__ import annotations

import copy
import functools
import operator
import os
import statistics
import time
import weakref

import torch
from torch import fx, nn

from .manager import PassResult
from .patterns import val

__all__ = ["prepack_linear_weights", "MIN_ROWS", "MAX_ROWS", "CPU_LINEAR_KERNELS", "available_kernels",
           "kernel_setting", "choose_kernel", "pack_weight", "run_packed", "packed_linear", "prepack_supported",
           "with_packed_linears"]

#: row counts (batch x tree nodes) whose linears are packed: one row is a GEMV (no packing to save), and above
#: MAX_ROWS the GEMM's own packing is amortised (the 64-token prefill chunk runs once per prompt)
MIN_ROWS, MAX_ROWS = 2, 32

#: the packed-kernel settings: a kernel for every linear, or "auto" (the faster per shape, measured)
CPU_LINEAR_KERNELS = ("auto", "mkl", "onednn")


@functools.cache  # a property of the build; packed_linear asks on every drafter linear call
def available_kernels() -> tuple[str, ...]:
    """The packed fp32 GEMM kernels this PyTorch build has (MKL on x86 builds, oneDNN on most)."""
    kernels = []
    if getattr(torch._C, "has_mkl", False) and hasattr(torch.ops.mkl, "_mkl_linear"):
        kernels.append("mkl")
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        kernels.append("onednn")
    return tuple(kernels)


def prepack_supported() -> bool:
    """Whether this PyTorch build can run packed linears (MKL or oneDNN built in)."""
    return bool(available_kernels())


def kernel_setting(kernel: str | None) -> str:
    """``kernel`` if given, else ``JETSPEC_CPU_LINEAR``, else ``"auto"``; a clear error for anything else."""
    kernel = kernel or os.environ.get("JETSPEC_CPU_LINEAR") or "auto"
    if kernel not in CPU_LINEAR_KERNELS:
        raise ValueError(f"cpu linear kernel (argument or JETSPEC_CPU_LINEAR) must be one of {CPU_LINEAR_KERNELS}, "
                         f"got {kernel!r}")
    return kernel


#: (out features, in features, rows) -> {kernel: median seconds}, measured once per process
TIMINGS: dict[tuple[int, int, int], dict[str, float]] = {}


def _time_kernels(out_features: int, in_features: int, rows: int, reps: int = 10) -> dict[str, float]:
    key = (out_features, in_features, rows)
    if key not in TIMINGS:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(out_features, in_features, generator=gen)
        x = torch.randn(rows, in_features, generator=gen)
        packed = {k: pack_weight(k, weight, rows) for k in available_kernels()}
        times: dict[str, list[float]] = {k: [] for k in packed}
        with torch.no_grad():
            for rep in range(reps + 2):
                for k, w in packed.items():  # interleaved, so drift hits both alike
                    start = time.perf_counter()
                    run_packed(k, x, w, weight, None, rows)
                    if rep >= 2:  # the first calls warm caches and oneDNN's primitive cache
                        times[k].append(time.perf_counter() - start)
        TIMINGS[key] = {k: statistics.median(t) for k, t in times.items()}
    return TIMINGS[key]


def choose_kernel(out_features: int, in_features: int, rows: int, kernel: str | None = None) -> str:
    """The packed kernel (``"mkl"`` or ``"onednn"``) for an fp32 ``[rows, in] @ [in, out]`` product.

    ``kernel``: ``"mkl"``, ``"onednn"`` or ``"auto"`` (default: ``JETSPEC_CPU_LINEAR``, else ``"auto"``): time both
    kernels on this shape once in this process and take the faster.
    """
    kernel = kernel_setting(kernel)
    available = available_kernels()
    if not available:
        raise RuntimeError("this PyTorch build has neither MKL nor oneDNN: no packed linears")
    if kernel != "auto":
        if kernel not in available:
            raise RuntimeError(f"cpu linear kernel {kernel!r} is not in this PyTorch build (it has {available}); "
                               "set JETSPEC_CPU_LINEAR=auto")
        return kernel
    if len(available) == 1:
        return available[0]
    times = _time_kernels(out_features, in_features, rows)
    return min(times, key=times.get)


def pack_weight(kernel: str, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` ``[out, in]`` packed for ``kernel``'s ``rows``-row GEMM (an opaque tensor)."""
    if kernel == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def run_packed(kernel: str, x, packed, weight, bias, rows: int):
    """``F.linear(x, weight, bias)`` through ``kernel`` from ``packed = pack_weight(kernel, weight, rows)``."""
    if kernel == "mkl":
        return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


#: id(weight) -> (weak reference, its version counter, {row count: (setting, kernel, packed)}) — shared by every
#: graph of a model, dropped with the weight (tensors compare elementwise, so they cannot key a WeakKeyDictionary)
_PACKED: dict[int, tuple[weakref.ref, int, dict[int, tuple[str, str, torch.Tensor]]]] = {}


def _packed(weight: torch.Tensor, rows: int) -> tuple[str, torch.Tensor]:
    """The kernel for ``weight`` at ``rows`` rows and ``weight`` packed for it, shared by every graph of that
    row count."""
    ref, version, by_rows = _PACKED.get(id(weight), (None, None, {}))
    known = ref is not None and ref() is weight  # an id can be reused by a later tensor
    if not known:
        weakref.finalize(weight, _PACKED.pop, id(weight), None)
    if not known or version != weight._version:  # new, or changed in place since it was packed
        by_rows = {}
        _PACKED[id(weight)] = (weakref.ref(weight), weight._version, by_rows)
    setting = kernel_setting(None)
    if by_rows.get(rows, (None,))[0] != setting:  # new row count, or JETSPEC_CPU_LINEAR changed since
        kernel = choose_kernel(weight.shape[0], weight.shape[1], rows, setting)
        with torch.no_grad():
            by_rows[rows] = setting, kernel, pack_weight(kernel, weight.detach(), rows)
    return by_rows[rows][1:]


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, from ``weight`` packed for this row count where that pays (fp32 on CPU,
    ``MIN_ROWS <= rows <= MAX_ROWS``, no autograd, MKL or oneDNN built in); plain ``F.linear`` otherwise."""
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    if (MIN_ROWS <= rows <= MAX_ROWS and x.dtype == weight.dtype == torch.float32 and weight.device.type == "cpu"
            and x.device.type == "cpu" and not torch.is_grad_enabled() and prepack_supported()):
        kernel, packed = _packed(weight, rows)
        out = run_packed(kernel, x.reshape(rows, x.shape[-1]), packed, weight, bias, rows)
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
        kernel, packed_weight = _packed(w, rows)
        name = packed_by_weight.get(weight.target)
        if name is None:
            name = f"_jetspec_packed_{len(packed_by_weight)}"
            gm.register_buffer(name, packed_weight, persistent=False)
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
