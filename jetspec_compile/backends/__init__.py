"""Lowering backends: how the rewritten verify graph runs.

``lower(name)`` returns a function ``GraphModule -> callable`` (None for eager, which runs the FX graph as is).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["lower"]


def lower(name: str) -> Callable | None:
    if name == "eager":
        return None
    raise NotImplementedError(f"backend {name!r} is not available in this build; use backend='eager'")
