"""Lowering backends: how the rewritten verify step (and the drafter's step) run.

Every backend implements the same two-method protocol, :class:`Backend`:

* ``lower_verify(step, options)`` turns a :class:`~jetspec_compile.capture.CapturedStep` that went through the
  tree-verify pipeline into a callable taking the step's inputs by name
  (:class:`~jetspec_compile.interface.VerifyInterface`) and returning ``(logits, hidden)``;
* ``lower_drafter(drafter, options)`` returns the drafter with its network's step running on the backend, or the
  drafter unchanged where the backend has no drafter lowering (it then runs in PyTorch).

The backends: ``eager`` (the rewritten FX graph run op by op; fp32 CPU linears from packed weights),
``inductor`` (``torch.compile`` with the ``jetspec`` backend: C++ on CPU, Triton on GPU), ``aoti`` (AOTInductor
``.pt2`` packages compiled once and reloaded), ``onnxruntime`` (ONNX export run by onnxruntime) and ``tensorrt``
(an engine built from that ONNX file; needs TensorRT and an NVIDIA GPU). :class:`LoweringOptions` carries what
they read from :class:`~jetspec_compile.config.JetSpecConfig`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import BACKENDS as BACKEND_NAMES
from ..config import JetSpecConfig
from ..drafter.precision import drafter_dtype_setting, in_drafter_dtype
from ..kernels.compact_linear import compact_setting
from ..kernels.cpu_linear import kernel_setting
from ..kernels.lm_head import lm_head_setting
from ..passes import LOWERING_PASSES, PassManager, prepack_linear_weights, split_lm_head
from .aoti import lower_aoti, lower_drafter_aoti
from .inductor import lower_inductor
from .onnx import lower_onnxruntime
from .onnx_drafter import lower_drafter_onnxruntime
from .tensorrt import lower_tensorrt

__all__ = ["Backend", "LoweringOptions", "BACKENDS", "get_backend", "lower", "lower_drafter", "lower_eager"]


@dataclass(frozen=True)
class LoweringOptions:
    """What the backends read from the config.

    Attributes:
        artifact_dir: folder of compiled packages (``aoti``; default: the cache folder).
        cpu_linear: packed GEMM of fp32 CPU linears (``eager``, ``inductor``, and every backend's prompt prefill):
            ``"auto"``, ``"mkl"``, ``"onednn"``; None: ``$JETSPEC_CPU_LINEAR``, else ``"auto"``.
        compact_weights: ``eager`` and ``inductor`` on CPU: ``"auto"`` or ``"off"``
            (:mod:`~jetspec_compile.kernels.compact_linear`); None: ``$JETSPEC_COMPACT_WEIGHTS``, else ``"auto"``.
        lm_head: ``eager`` and ``inductor`` on CPU: ``"auto"``, ``"certified"``, ``"exact"``
            (:func:`~jetspec_compile.passes.split_lm_head`); None: ``$JETSPEC_LM_HEAD``, else ``"auto"``.
        drafter_dtype: ``eager``, ``inductor`` and ``aoti`` on CPU: ``"auto"``, ``"float32"``, ``"bfloat16"``
            (:mod:`~jetspec_compile.drafter.precision`); None: ``$JETSPEC_DRAFTER_DTYPE``, else ``"auto"``.
        max_cache_len: longest cache a built engine must accept (``tensorrt``'s optimisation profile).
        precision: TensorRT engine precision, ``"fp32"``, ``"fp16"`` or ``"bf16"``; None: the model's own dtype.
    """

    artifact_dir: str | None = None
    cpu_linear: str | None = None
    compact_weights: str | None = None
    lm_head: str | None = None
    drafter_dtype: str | None = None
    max_cache_len: int = 2048
    precision: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cpu_linear", kernel_setting(self.cpu_linear))  # checked once, read once
        object.__setattr__(self, "compact_weights", compact_setting(self.compact_weights))
        object.__setattr__(self, "lm_head", lm_head_setting(self.lm_head))
        object.__setattr__(self, "drafter_dtype", drafter_dtype_setting(self.drafter_dtype))
        if self.precision not in (None, "fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be 'fp32', 'fp16', 'bf16' or None, got {self.precision!r}")

    @classmethod
    def from_config(cls, config: JetSpecConfig) -> "LoweringOptions":
        return cls(artifact_dir=config.artifact_dir, cpu_linear=config.cpu_linear,
                   compact_weights=config.compact_weights, lm_head=config.lm_head,
                   drafter_dtype=config.drafter_dtype, max_cache_len=config.max_cache_len,
                   precision=config.precision)


class Backend:
    """A lowering backend (see the module docstring). Subclasses set ``name`` and implement ``lower_verify``."""

    name: str = ""

    def lower_verify(self, step, options: LoweringOptions) -> Callable:
        raise NotImplementedError

    def lower_drafter(self, drafter, options: LoweringOptions):
        return drafter  # the drafter's step stays in PyTorch, as given


def _on_cpu(drafter) -> bool:
    network = getattr(drafter, "model", None)
    params = list(network.parameters()) if isinstance(network, torch.nn.Module) else []
    return bool(params) and params[0].device.type == "cpu"


def lower_eager(step, prepack: bool = True, cpu_linear: str | None = None, lm_head: str | None = "exact",
                compact_weights: str | None = None):
    """The rewritten FX graph itself, after the PyTorch lowering passes (native grouped-query attention), the LM
    head left to the runtime where ``lm_head`` says so (:func:`~jetspec_compile.passes.split_lm_head`; default
    ``"exact"``: kept) and, with ``prepack``, fp32 CPU linears run from packed or exactly compact weights
    (:func:`~jetspec_compile.passes.prepack_linear_weights`, ``compact_weights``)."""
    cpu_linear = kernel_setting(cpu_linear)
    compact_weights = compact_setting(compact_weights)
    passes = LOWERING_PASSES + (functools.partial(split_lm_head, setting=lm_head, cpu_linear=cpu_linear),)
    passes += ((functools.partial(prepack_linear_weights, kernel=cpu_linear, compact=compact_weights),)
               if prepack else ())
    PassManager(passes)(step)
    return step.graph_module


class EagerBackend(Backend):
    name = "eager"

    def lower_verify(self, step, options):
        return lower_eager(step, cpu_linear=options.cpu_linear, lm_head=options.lm_head,
                           compact_weights=options.compact_weights)

    def lower_drafter(self, drafter, options):
        return in_drafter_dtype(drafter, options.drafter_dtype)  # on CPU, in PyTorch from packed weights


class InductorBackend(Backend):
    name = "inductor"

    def lower_verify(self, step, options):
        return lower_inductor(step, cpu_linear=options.cpu_linear, lm_head=options.lm_head,
                              compact_weights=options.compact_weights)

    def lower_drafter(self, drafter, options):
        # on CPU the drafter's step runs an AOTInductor package (compiled once per drafter and cached, like the
        # ``aoti`` backend's): a torch.compile'd step with its dynamic context length would run unpacked linears,
        # slower than eager (docs/profile.md); on CUDA it stays in PyTorch
        if not _on_cpu(drafter):
            return drafter
        return lower_drafter_aoti(in_drafter_dtype(drafter, options.drafter_dtype), artifact_dir=options.artifact_dir)


class AotiBackend(Backend):
    name = "aoti"

    def lower_verify(self, step, options):
        return lower_aoti(step, artifact_dir=options.artifact_dir)

    def lower_drafter(self, drafter, options):
        return lower_drafter_aoti(in_drafter_dtype(drafter, options.drafter_dtype), artifact_dir=options.artifact_dir)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def lower_verify(self, step, options):
        return lower_onnxruntime(step)

    def lower_drafter(self, drafter, options):
        return lower_drafter_onnxruntime(drafter)


class TensorRTBackend(Backend):
    name = "tensorrt"

    def lower_verify(self, step, options):
        return lower_tensorrt(step, max_cache_len=options.max_cache_len, precision=options.precision)


#: every backend by name (the names :data:`jetspec_compile.config.BACKENDS` lists)
BACKENDS: dict[str, Backend] = {b.name: b for b in (EagerBackend(), InductorBackend(), AotiBackend(),
                                                    OnnxRuntimeBackend(), TensorRTBackend())}
assert tuple(BACKENDS) == BACKEND_NAMES, "config.BACKENDS and the backend registry disagree"


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(map(repr, BACKENDS))}")
    return BACKENDS[name]


def lower(name: str, options: LoweringOptions | None = None) -> Callable:
    """``step -> callable``: backend ``name``'s verify lowering with ``options`` (what ``TreeVerifier`` takes as
    ``compile_fn``)."""
    return functools.partial(get_backend(name).lower_verify, options=options or LoweringOptions())


def lower_drafter(name: str, drafter, options: LoweringOptions | None = None):
    """``drafter`` with its steps on backend ``name`` (or unchanged where the backend has no drafter lowering)."""
    return get_backend(name).lower_drafter(drafter, options or LoweringOptions())
