"""Packed GEMMs for CPU linears with few rows: fp32 (MKL or oneDNN, chosen per weight shape) and bf16 (oneDNN).

A tree-verify or drafter step multiplies a handful of rows (``B*N``, typically 4..32) by every weight. On CPU a
plain ``aten.linear`` with so few rows goes through a GEMM that re-packs the weight on every call, which costs
about as much as reading it. Packing each weight once per row count and calling the packed kernel avoids that.
Two packed kernels exist, and which is faster depends on the CPU:

* ``"mkl"``: ``torch.ops.mkl._mkl_linear`` from ``mkl._mkl_reorder_linear_weight`` (what Inductor picks for fp32);
* ``"onednn"``: ``torch.ops.mkldnn._linear_pointwise`` from ``mkldnn._reorder_linear_weight``.

MKL's small-row GEMMs are fast on Intel CPUs and slow on others (figures in ``docs/results.md``). The setting
``"auto"`` (default) times both once per weight shape and row count in the process and takes the faster;
``"mkl"`` / ``"onednn"`` force one. The setting comes from :class:`~jetspec_compile.config.JetSpecConfig`'s
``cpu_linear`` (the ``JETSPEC_CPU_LINEAR`` environment variable is its default), read when a graph is lowered or
a module wrapped, never per call. Both kernels compute in fp32; only the summation order differs.

bf16 weights (a drafter computing in bf16, ``JetSpecConfig.drafter_dtype``) always take oneDNN's packed bf16 GEMM:
MKL has none, and oneDNN's reads half the bytes.

Memory: one packed copy per weight and row count, shared by every graph and module of that count and dropped
with the weight; a weight changed in place is packed again. A single row (plain decoding) is left to the GEMV.

A prompt's prefill multiplies many rows (the prompt's length) by every weight. There too MKL's unpacked GEMM is
slower than oneDNN's packed one on AMD CPUs (``docs/profile.md``), so within a :class:`PackedLinearMode` every
linear of two rows or more runs from one copy packed for :data:`PREFILL_ROWS` rows: oneDNN's packed GEMM takes
any row count; MKL's runs its packed copy at exactly that count and the plain GEMM otherwise.
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
import weakref

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import CPU_LINEARS, env_setting

__all__ = ["MIN_ROWS", "MAX_ROWS", "PREFILL_ROWS", "CPU_LINEAR_KERNELS", "available_kernels", "kernel_setting",
           "choose_kernel", "pack_weight", "run_packed", "derived", "packed_weight", "packed_linear",
           "prepack_supported", "bf16_supported", "native_bf16", "cpuinfo_has_bf16", "PackedLinear",
           "with_packed_linears", "PackedLinearMode", "TIMINGS"]

#: row counts (batch x tree nodes) whose linears are packed per count: one row is a GEMV (no packing to save); above
#: MAX_ROWS a graph is a prefill chunk, run once per prompt (the model's own prefill packs once, PREFILL_ROWS)
MIN_ROWS, MAX_ROWS = 2, 32

#: the row count a prefill's weights are packed for (one copy for every prompt length; see the module docstring)
PREFILL_ROWS = 128

#: the packed-kernel settings: a kernel for every linear, or "auto" (the faster per shape, measured)
CPU_LINEAR_KERNELS = CPU_LINEARS


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


@functools.cache
def bf16_supported() -> bool:
    """Whether oneDNN's bf16 GEMM is available here (packed bf16 linears; the certified LM head)."""
    return "onednn" in available_kernels() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``), as
    read from ``/proc/cpuinfo``; False where that cannot be read. Without them oneDNN emulates bf16 arithmetic."""
    try:
        with open("/proc/cpuinfo") as f:
            return cpuinfo_has_bf16(f.read())
    except OSError:
        return False


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """Whether a ``/proc/cpuinfo`` text lists bf16 dot-product instructions (see :func:`native_bf16`)."""
    flags = {word for line in cpuinfo.splitlines() if line.lower().startswith(("flags", "features"))
             for word in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def kernel_setting(kernel: str | None) -> str:
    """``kernel`` if given, else ``JETSPEC_CPU_LINEAR``, else ``"auto"``; a clear error for anything else."""
    return env_setting(kernel, "JETSPEC_CPU_LINEAR", CPU_LINEAR_KERNELS, "cpu linear kernel")


#: (out features, in features, rows) -> {kernel: median seconds}, measured once per process
TIMINGS: dict[tuple[int, int, int], dict[str, float]] = {}


#: bytes of distinct weights a kernel timing cycles through: more than the last-level cache (32 MB on the AMD EPYC
#: we measure on), so each call reads its weight from memory, as a model's forward does with each layer's
STREAM_BYTES = 64 << 20
MAX_COPIES = 32


def _time_kernels(out_features: int, in_features: int, rows: int, reps: int = 10) -> dict[str, float]:
    key = (out_features, in_features, rows)
    if key not in TIMINGS:
        gen = torch.Generator().manual_seed(0)
        # one weight timed over and over would stay in the cache and favour the kernel with the cheapest call; a
        # decoding step streams every weight once, so the timing cycles through as many distinct ones (docs/profile.md)
        copies = max(1, min(MAX_COPIES, -(-STREAM_BYTES // (4 * out_features * in_features))))
        weights = [torch.randn(out_features, in_features, generator=gen) for _ in range(copies)]
        x = torch.randn(rows, in_features, generator=gen)
        packed = {k: [pack_weight(k, w, rows) for w in weights] for k in available_kernels()}
        times: dict[str, list[float]] = {k: [] for k in packed}
        with torch.no_grad():
            for rep in range(reps + 2):
                for k, ws in packed.items():  # interleaved, so drift hits both alike
                    start = time.perf_counter()
                    for w, weight in zip(ws, weights):
                        run_packed(k, x, w, weight, None, rows)
                    if rep >= 2:  # the first calls warm caches and oneDNN's primitive cache
                        times[k].append((time.perf_counter() - start) / copies)
        TIMINGS[key] = {k: statistics.median(t) for k, t in times.items()}
    return TIMINGS[key]


def choose_kernel(out_features: int, in_features: int, rows: int, kernel: str | None = None) -> str:
    """The packed kernel (``"mkl"`` or ``"onednn"``) for an fp32 ``[rows, in] @ [in, out]`` product.

    ``kernel``: ``"mkl"``, ``"onednn"`` or ``"auto"`` (default: ``JETSPEC_CPU_LINEAR``, else ``"auto"``): time both
    kernels on this shape once in this process, on weights read from memory (:data:`STREAM_BYTES`), and take the
    faster.
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


def derived(weight: torch.Tensor, store: dict) -> dict:
    """The dict of what ``store`` keeps derived from ``weight`` (packed copies, a bf16 copy, ...): empty for a new
    weight and after an in-place change of it. ``store`` maps ``id(weight)`` to (weak reference, version counter,
    that dict), so the derived tensors are shared by every graph and module and dropped with the weight (tensors
    compare elementwise, so they cannot key a WeakKeyDictionary)."""
    ref, version, entries = store.get(id(weight), (None, None, None))
    known = ref is not None and ref() is weight  # an id can be reused by a later tensor
    if not known:
        weakref.finalize(weight, store.pop, id(weight), None)
    if not known or version != weight._version:  # new, or changed in place since
        entries = {}
        store[id(weight)] = (weakref.ref(weight), weight._version, entries)
    return entries


#: id(weight) -> (weak reference, version, {row count: (setting, kernel, packed)}): see :func:`derived`
_PACKED: dict[int, tuple[weakref.ref, int, dict[int, tuple[str, str, torch.Tensor]]]] = {}


def packed_weight(weight: torch.Tensor, rows: int, setting: str = "auto") -> tuple[str, torch.Tensor]:
    """The kernel for ``weight`` at ``rows`` rows under ``setting`` and ``weight`` packed for it, shared by every
    graph and module of that row count (packed again after an in-place change of ``weight``). A bf16 weight always
    takes oneDNN (MKL's packed GEMM is fp32 only)."""
    by_rows = derived(weight, _PACKED)
    if by_rows.get(rows, (None,))[0] != setting:  # new row count, or another setting since
        kernel = ("onednn" if weight.dtype == torch.bfloat16
                  else choose_kernel(weight.shape[0], weight.shape[1], rows, setting))
        with torch.no_grad():
            by_rows[rows] = setting, kernel, pack_weight(kernel, weight.detach(), rows)
    return by_rows[rows][1:]


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  setting: str = "auto", pack_rows: int | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, from ``weight`` packed for this row count where that pays (fp32 on CPU,
    ``MIN_ROWS <= rows <= MAX_ROWS``, no autograd, MKL or oneDNN built in; or bf16 with oneDNN's bf16 GEMM);
    plain ``F.linear`` otherwise.

    pack_rows: pack once for this row count instead and run every call of at least ``MIN_ROWS`` rows from that
    copy (a prefill, whose row count is the prompt's length; see the module docstring).
    """
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    key = rows if pack_rows is None else pack_rows
    if (MIN_ROWS <= rows and (pack_rows is not None or rows <= MAX_ROWS)
            and x.dtype == weight.dtype and weight.device.type == "cpu" and x.device.type == "cpu"
            and not torch.is_grad_enabled() and _packable(weight.dtype)):
        kernel, packed = packed_weight(weight, key, setting)
        out = run_packed(kernel, x.reshape(rows, x.shape[-1]), packed, weight, bias, key)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight, bias)


def _packable(dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return prepack_supported()
    return dtype == torch.bfloat16 and bf16_supported()


class PackedLinear(nn.Module):
    """An ``nn.Linear``'s parameters (shared, not copied) run through :func:`packed_linear` with ``setting``."""

    def __init__(self, linear: nn.Linear, setting: str = "auto"):
        super().__init__()
        self.weight, self.bias, self.setting = linear.weight, linear.bias, setting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias, self.setting)


def with_packed_linears(module: nn.Module, kernel: str | None = None) -> nn.Module:
    """A structural copy of ``module`` that shares every parameter and buffer, with each ``nn.Linear`` replaced
    by a :class:`PackedLinear` (for eager inference on CPU; ``module`` itself is left as it is). ``kernel``: the
    setting (see :func:`kernel_setting`), read once here.

    The copy shares the modules' hook dicts too, so it suits modules of this package, not models that install
    hooks as they run (Hugging Face's output recording does): for those, see :class:`PackedLinearMode`."""
    setting = kernel_setting(kernel)
    if isinstance(module, nn.Linear):
        return PackedLinear(module, setting)
    clone = copy.copy(module)  # shallow: the parameter and buffer dicts are the same objects
    clone._modules = {name: None if child is None else with_packed_linears(child, setting)
                      for name, child in module._modules.items()}
    return clone


class PackedLinearMode(TorchFunctionMode):
    """While active, every fp32 ``F.linear`` (``nn.Linear`` included) runs through :func:`packed_linear` with
    ``pack_rows`` (default :data:`PREFILL_ROWS`): a model's prefill on packed weights without copying or changing
    the model. ``kernel``: the setting (see :func:`kernel_setting`), read once here. Linears of other dtypes run as
    the model would run them: a bf16 target's prefill must round as HF's does, so its first token is HF's."""

    def __init__(self, kernel: str | None = None, pack_rows: int = PREFILL_ROWS):
        super().__init__()
        self.setting, self.pack_rows = kernel_setting(kernel), pack_rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if func is torch.nn.functional.linear and weight is not None and weight.dtype == torch.float32:
            # the mode is off inside this handler: no recursion
            return packed_linear(*args, **kwargs, setting=self.setting, pack_rows=self.pack_rows)
        return func(*args, **kwargs)
