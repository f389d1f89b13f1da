"""Lowering backends: how the rewritten verify graph runs.

``lower(name)`` returns a function ``CapturedStep -> callable`` taking the graph's inputs by name:

* ``eager``: the rewritten FX graph (plus the PyTorch lowering passes), run op by op by PyTorch; on CPU its fp32
  linears use weights packed once for MKL's GEMM.
* ``inductor``: ``torch.compile`` with the ``jetspec`` backend (Inductor: C++ on CPU, Triton on GPU).
* ``aoti``: the verify step compiled ahead of time by AOTInductor into a ``.pt2`` package, saved and reloaded
  without compiling (``artifact_dir``).
* ``onnxruntime``: the verify step exported to ONNX, run by onnxruntime.
* ``tensorrt``: a TensorRT engine built from that ONNX file (needs ``tensorrt`` and a GPU).

``lower_drafter(name)`` does the same for the drafter's step where the backend has a lowering for it
(``onnxruntime``, ``aoti``); elsewhere the drafter runs in PyTorch.
"""

from __future__ import annotations

from typing import Callable

import functools

__all__ = ["lower", "lower_drafter", "lower_eager", "write_new_kv"]


def write_new_kv(inputs: dict, new_kv, num_layers: int) -> None:
    """Write an exported step's new keys/values (``k_new_0, v_new_0, ...``) into the caches it was given, at
    ``write_slots``: what the eager graph's in-place writes do."""
    import torch

    slots = inputs["write_slots"]
    for layer in range(num_layers):
        for j, kv in enumerate("kv"):
            cache = inputs[f"{kv}_cache_{layer}"]
            new = new_kv[2 * layer + j]
            new = torch.from_numpy(new) if not isinstance(new, torch.Tensor) else new
            cache.index_copy_(2, slots, new.to(cache.device, cache.dtype))


def lower_eager(step, prepack: bool = True):
    """The rewritten FX graph itself, after the PyTorch lowering passes (native grouped-query attention) and,
    with ``prepack``, fp32 CPU linears run from MKL-packed weights (:func:`~jetspec_compile.passes.prepack_linear_weights`)."""
    from ..passes import EAGER_CPU_PASSES, LOWERING_PASSES, PassManager

    PassManager(EAGER_CPU_PASSES if prepack else LOWERING_PASSES)(step)
    return step.graph_module


def lower(name: str, artifact_dir=None) -> Callable | None:
    """The lowering function of backend ``name``; ``artifact_dir`` is where ``aoti`` keeps its packages."""
    if name == "eager":
        return lower_eager
    if name == "inductor":
        from .inductor import lower_inductor
        return lower_inductor
    if name == "aoti":
        from .aoti import lower_aoti
        return functools.partial(lower_aoti, artifact_dir=artifact_dir)
    if name == "onnxruntime":
        from .onnx import lower_onnxruntime
        return lower_onnxruntime
    if name == "tensorrt":
        from .tensorrt import lower_tensorrt
        return lower_tensorrt
    raise ValueError(f"unknown backend {name!r}; available: 'eager', 'inductor', 'aoti', 'onnxruntime', 'tensorrt'")


def lower_drafter(name: str, artifact_dir=None) -> Callable | None:
    """``drafter -> drafter`` running its steps on backend ``name``, or None where the drafter stays in PyTorch."""
    if name == "aoti":
        from .aoti import lower_drafter_aoti
        return functools.partial(lower_drafter_aoti, artifact_dir=artifact_dir)
    if name == "onnxruntime":
        from .onnx import lower_drafter_onnxruntime
        return lower_drafter_onnxruntime
    return None
