"""Lowering backends: how the rewritten verify graph runs.

``lower(name)`` returns a function ``GraphModule -> callable`` (None for eager, which runs the FX graph as is):

* ``eager``: the rewritten FX graph, run op by op by PyTorch.
* ``inductor``: ``torch.compile`` with the ``jetspec`` backend (Inductor: C++ on CPU, Triton on GPU).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["lower"]


def lower(name: str) -> Callable | None:
    if name == "eager":
        return None
    if name == "inductor":
        from .inductor import lower_inductor
        return lower_inductor
    raise NotImplementedError(
        f"backend {name!r} is not implemented in this release; available: 'eager', 'inductor'")
