"""Lowering backends: how the rewritten verify graph runs.

``lower(name)`` returns a function ``CapturedStep -> callable`` taking the graph's inputs by name:

* ``eager``: the rewritten FX graph (plus the PyTorch lowering passes), run op by op by PyTorch.
* ``inductor``: ``torch.compile`` with the ``jetspec`` backend (Inductor: C++ on CPU, Triton on GPU).
* ``onnxruntime``: the verify step exported to ONNX, run by onnxruntime.
* ``tensorrt``: a TensorRT engine built from that ONNX file (needs ``tensorrt`` and a GPU).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["lower", "lower_eager"]


def lower_eager(step):
    """The rewritten FX graph itself, after the PyTorch lowering passes (native grouped-query attention)."""
    from ..passes import LOWERING_PASSES, PassManager

    PassManager(LOWERING_PASSES)(step)
    return step.graph_module


def lower(name: str) -> Callable | None:
    if name == "eager":
        return lower_eager
    if name == "inductor":
        from .inductor import lower_inductor
        return lower_inductor
    if name == "onnxruntime":
        from .onnx import lower_onnxruntime
        return lower_onnxruntime
    if name == "tensorrt":
        from .tensorrt import lower_tensorrt
        return lower_tensorrt
    raise ValueError(f"unknown backend {name!r}; available: 'eager', 'inductor', 'onnxruntime', 'tensorrt'")
