"""fp32 linears from compactly stored weights, bit for bit the same weights: fewer bytes for few-row GEMMs to read.

Decoding and tree verification multiply a handful of rows by every weight, so on CPU their GEMMs are bound by
reading the weights. Many fp32 models need fewer bits per weight than fp32 spends:

* ``"bf16"``: a model saved in bf16 and loaded as fp32 (most Hugging Face checkpoints) has every weight exactly
  representable in bf16. Stored as its upper 16 bits: half the bytes.
* ``"q4"``: a model dequantized from a 4-bit GGUF file (Q4_1; SmolLM2 as shipped here) has, in every block of 32
  consecutive inputs of an output row, weights ``scale * code + min`` with a 4-bit ``code``. Stored as the codes and
  one fp32 scale and min per block: 0.75 bytes per weight, 19% of fp32's.

:func:`encode` checks every weight of a tensor and returns a form only when decoding gives back each fp32 value bit
for bit (``None`` otherwise: the caller keeps its fp32 GEMM). The kernels (``compact_linear.cpp``, compiled on first
use with the C++ compiler Inductor uses, and cached) decode each weight to that value and multiply it with the fp32
activations in fp32, accumulating in fp32: the products an fp32 GEMM forms, summed in another order, as any two GEMM
kernels sum them. Greedy verification therefore stays HF's argmax up to the rounding of a sum, like the oneDNN and
MKL kernels it replaces (tests compare outputs with HF ``generate`` end to end).

The ops ``torch.ops.jetspec_cpu.linear_q4`` / ``linear_bf16w`` take ``[..., in]`` fp32 inputs and are traceable
(fake implementations registered), so frozen Inductor graphs call them as extern kernels
(:class:`~jetspec_compile.backends.inductor.PackedLinearPass`) and the eager backend's graphs call them directly
(:func:`~jetspec_compile.passes.prepack_linear_weights`). They pay for few rows (up to
:data:`~jetspec_compile.kernels.cpu_linear.MAX_ROWS`); a prompt's prefill keeps oneDNN's fp32 GEMM.

Setting: ``compact_weights`` of :class:`~jetspec_compile.config.JetSpecConfig` (``$JETSPEC_COMPACT_WEIGHTS``):
``"auto"`` (default) uses the most compact exact form where the kernels build on this machine, ``"off"`` never.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import COMPACT_WEIGHTS, env_setting
from ..io import atomic_file, file_lock
from ..paths import cache_dir
from .cpu_linear import derived

logger = logging.getLogger(__name__)

__all__ = ["FORMS", "CompactWeight", "encode", "compact_weight", "kernels_available", "build_error",
           "compact_setting"]

#: compact forms, most compact first: the first exact one is taken
FORMS = ("q4", "bf16")
LANES = 16  # output columns per vector (the kernel's tile)
BLOCK = 32  # inputs per q4 scale and min
SOURCE = Path(__file__).with_name("compact_linear.cpp")


def compact_setting(value: str | None) -> str:
    """``value`` if given, else ``$JETSPEC_COMPACT_WEIGHTS``, else ``"auto"``; a clear error for anything else."""
    return env_setting(value, "JETSPEC_COMPACT_WEIGHTS", COMPACT_WEIGHTS, "compact weights setting")


# ---------------------------------------------------------------------------------------------------------- build

_BUILD_ERROR: list[str] = []


def _compile_command(source: Path, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++, c++ or clang++; or set CXX)")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    rpath = [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [cxx, str(source), "-o", str(out), "-shared", "-fPIC", "-std=c++17", "-O3", "-march=native",
            "-fopenmp", abi, *includes, f"-I{sysconfig.get_paths()['include']}", *libs, *rpath,
            "-lc10", "-ltorch_cpu", "-ltorch"]


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.lower().startswith(("flags", "features"))), "").encode()
    except OSError:
        return platform.processor().encode()


def _library_path() -> Path:
    # -march=native: one build per instruction set, PyTorch version and source
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + platform.machine().encode()
                         + _cpu_flags()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"compact_linear_{key}.so"


def kernels_available() -> bool:
    """Build (once per machine and PyTorch version, cached under the cache folder) and load the kernels. False,
    with the reason in :func:`build_error` and a warning logged, where that fails (no C++ compiler, not a CPU
    build): callers then keep their fp32 GEMMs. Thread-safe; decided once per process."""
    with _LOAD_LOCK:  # a library loaded twice would register its ops twice
        return _load()


_LOAD_LOCK = threading.Lock()


@functools.cache
def _load() -> bool:
    try:
        path = _library_path()
        if not path.exists():
            with file_lock(path.with_suffix(".lock")):
                if not path.exists():  # another process built it while this one waited
                    logger.info("compiling %s (once per machine, ~10 s)", SOURCE.name)
                    with atomic_file(path, suffix=".so") as tmp:
                        done = subprocess.run(_compile_command(SOURCE, tmp), capture_output=True, text=True)
                        if done.returncode:
                            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        torch.ops.load_library(str(path))
        _register_fakes()
        return True
    except Exception as exc:  # a missing compiler must not stop a model from running: fp32 GEMMs remain
        _BUILD_ERROR.append(str(exc))
        logger.warning("compact-weight linears unavailable, fp32 GEMMs are used: %s", exc)
        return False


def build_error() -> str | None:
    """Why :func:`kernels_available` returned False (None if it did not)."""
    return _BUILD_ERROR[-1] if _BUILD_ERROR else None


def _register_fakes() -> None:
    def out_like(input, codes):
        return input.new_empty((*input.shape[:-1], codes.shape[0] * LANES))

    @torch.library.register_fake("jetspec_cpu::linear_q4")
    def _(input, codes, scales, mins, bias):
        return out_like(input, codes)

    @torch.library.register_fake("jetspec_cpu::linear_bf16w")
    def _(input, codes, bias):
        return out_like(input, codes)


# --------------------------------------------------------------------------------------------------------- encode

@dataclass(frozen=True)
class CompactWeight:
    """An ``[out, in]`` fp32 weight in a compact form that decodes to it bit for bit (see the module docstring)."""

    form: str
    codes: torch.Tensor
    scales: torch.Tensor | None = None
    mins: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.codes.shape[0] * LANES

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The op's weight arguments, in order."""
        return (self.codes,) if self.form == "bf16" else (self.codes, self.scales, self.mins)

    def op(self):
        """The op computing ``F.linear(input, weight, bias)`` from ``(input, *tensors(), bias)``."""
        return torch.ops.jetspec_cpu.linear_bf16w.default if self.form == "bf16" else \
            torch.ops.jetspec_cpu.linear_q4.default

    def linear(self, input: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(input, weight, bias)`` for an fp32 CPU ``input``."""
        return self.op()(input, *self.tensors(), bias)

    def decode(self) -> torch.Tensor:
        """The fp32 weight back (for checks; the kernels never materialise it)."""
        tiles = self.codes.shape[0]
        if self.form == "bf16":
            return self.codes.view(torch.bfloat16).float().permute(0, 2, 1).reshape(tiles * LANES, -1)
        codes = torch.stack([self.codes & 15, self.codes >> 4], dim=2).flatten(1, 2)  # [T, K, 16]
        scales = self.scales.repeat_interleave(BLOCK, dim=1)
        mins = self.mins.repeat_interleave(BLOCK, dim=1)
        return (codes.float() * scales + mins).permute(0, 2, 1).reshape(tiles * LANES, -1)


def _tiles(t: torch.Tensor) -> torch.Tensor:
    """``[N, X]`` -> ``[N/16, X, 16]``: 16 output columns side by side, as the kernels read them."""
    return t.reshape(t.shape[0] // LANES, LANES, t.shape[1]).permute(0, 2, 1).contiguous()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.view(torch.int32) == b.view(torch.int32)


def _encode_q4(w: torch.Tensor) -> CompactWeight | None:
    n, k = w.shape
    if k % BLOCK:
        return None
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    lo = blocks.amin(-1, keepdim=True)
    hi = blocks.amax(-1, keepdim=True)
    fitted = (hi - lo) / 15
    found = torch.zeros(n, k // BLOCK, dtype=torch.bool)
    scales = torch.zeros_like(lo)
    codes = torch.zeros(blocks.shape, dtype=torch.uint8)
    # the scale as fitted, or rounded to fp16 (what a GGUF file stores), whichever decodes the block exactly
    for scale in (fitted, fitted.half().float()):
        q = torch.where(scale > 0, ((blocks - lo) / scale).round(), torch.zeros_like(blocks))
        if not torch.isfinite(q).all():
            return None
        q = q.clamp(0, 15)
        product = scale * q
        exact_product = product.double() == scale.double() * q.double()  # so a fused multiply-add rounds alike
        ok = (_same_bits(product + lo, blocks) & exact_product).all(-1) & ~found
        scales = torch.where(ok.unsqueeze(-1), scale, scales)
        codes = torch.where(ok.unsqueeze(-1), q.to(torch.uint8), codes)
        found |= ok
    if not found.all():
        return None
    codes = _tiles(codes.reshape(n, k))  # [T, K, 16]
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    return CompactWeight("q4", packed, _tiles(scales.reshape(n, -1)), _tiles(lo.reshape(n, -1)))


def _encode_bf16(w: torch.Tensor) -> CompactWeight | None:
    narrow = w.bfloat16()
    if not _same_bits(narrow.float(), w).all():
        return None
    return CompactWeight("bf16", _tiles(narrow.view(torch.int16)))


def encode(weight: torch.Tensor, forms: tuple[str, ...] = FORMS) -> CompactWeight | None:
    """The most compact of ``forms`` that holds every value of the fp32 ``[out, in]`` ``weight`` exactly, or None
    (not fp32, not 2-D, ``out`` not a multiple of 16, or no form exact)."""
    unknown = set(forms) - set(FORMS)
    if unknown:
        raise ValueError(f"compact weight forms must be among {FORMS}, got {sorted(unknown)}")
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[0] % LANES or weight.device.type != "cpu":
        return None
    w = weight.detach().contiguous()
    for form in forms:
        encoder = _encode_q4 if form == "q4" else _encode_bf16
        # the first tile's rows first: most fp32 weights fail there, before the whole tensor's temporaries (an LM
        # head's run to ~1 GB) are made
        if encoder(w[:LANES]) is not None and (found := encoder(w)) is not None:
            return found
    return None


#: id(weight) -> (weak reference, version, {"compact": CompactWeight | None}): see cpu_linear.derived
_ENCODED: dict = {}


def compact_weight(weight: torch.Tensor, setting: str | None = None) -> CompactWeight | None:
    """:func:`encode` of ``weight`` if ``setting`` allows it and the kernels are available here, else None;
    computed once per weight (and again after an in-place change) and shared by every graph."""
    if compact_setting(setting) == "off" or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    if not kernels_available():
        return None
    entries = derived(weight, _ENCODED)
    if "compact" not in entries:
        with torch.no_grad():
            entries["compact"] = encode(weight)
    return entries["compact"]

