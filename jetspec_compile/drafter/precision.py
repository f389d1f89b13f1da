"""What a parallel drafter's network computes in on CPU (``JetSpecConfig.drafter_dtype``).

A draft step is a few rows against every drafter weight (~11 M parameters for SmolLM2's drafter): like the verify
step it is bound by the bytes it reads, so bf16 weights halve its main cost. Unlike the target, the drafter only
proposes: its precision changes which tokens it proposes (acceptance), never what the loop emits, and its draft
distributions are used as computed, so sampling stays exact too.
"""

from __future__ import annotations

import torch

from ..config import DRAFTER_DTYPES, env_setting
from ..kernels.cpu_linear import bf16_supported, native_bf16
from .jetspec import JetSpecDrafter

__all__ = ["drafter_dtype_setting", "resolve_drafter_dtype", "in_drafter_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def drafter_dtype_setting(setting: str | None) -> str:
    """``setting`` if given, else ``$JETSPEC_DRAFTER_DTYPE``, else ``"auto"``; a clear error for anything else."""
    return env_setting(setting, "JETSPEC_DRAFTER_DTYPE", DRAFTER_DTYPES, "drafter_dtype")


def resolve_drafter_dtype(setting: str | None) -> torch.dtype:
    """The dtype ``setting`` means here: ``"auto"`` is bf16 where the CPU has bf16 instructions and oneDNN its bf16
    GEMM (elsewhere bf16 is emulated or unpacked, and slower), else fp32. ``"bfloat16"`` without oneDNN's bf16
    GEMM is refused."""
    setting = drafter_dtype_setting(setting)
    if setting == "auto":
        return torch.bfloat16 if bf16_supported() and native_bf16() else torch.float32
    if setting == "bfloat16" and not bf16_supported():
        raise RuntimeError("drafter_dtype='bfloat16' needs oneDNN's bf16 GEMM, which this PyTorch build or CPU "
                           "lacks; use drafter_dtype='float32'")
    return _DTYPES[setting]


def in_drafter_dtype(drafter, setting: str | None):
    """``drafter`` with its network in the dtype ``setting`` resolves to, where it is a JetSpec drafter whose fp32
    network runs on CPU; anything else (n-gram drafters, networks on a GPU, or already in another dtype the caller
    chose) is returned as it is."""
    if not isinstance(drafter, JetSpecDrafter):
        return drafter
    weight = drafter.model.fc.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return drafter
    return drafter.with_dtype(resolve_drafter_dtype(setting))
