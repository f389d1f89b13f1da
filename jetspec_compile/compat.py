"""The oldest library versions the package runs with, and the spellings that changed between them.

The package is tested with torch 2.13 / transformers 5.24 (this repository's CI) and with transformers 5.17
(``make test-compat``), the version of the GPU image the GPU check runs in (torch 2.11, triton 3.6).
:func:`check_versions` names the version when an older one is installed, instead of failing later with an
unrelated error.
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["MIN_TORCH", "MIN_TRANSFORMERS", "cache_argument", "check_versions"]

#: oldest releases the package is checked against (torch: the GPU image; transformers: ``make test-compat``)
MIN_TORCH = (2, 11)
MIN_TRANSFORMERS = (5, 17)


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_versions() -> None:
    """Raise ImportError naming the package and version if torch or transformers is older than supported."""
    import torch
    import transformers

    for name, module, least in (("torch", torch, MIN_TORCH), ("transformers", transformers, MIN_TRANSFORMERS)):
        if _release(module.__version__) < least:
            raise ImportError(f"jetspec_compile needs {name} >= {'.'.join(map(str, least))}, found "
                              f"{module.__version__}; upgrade it (pip install -U '{name}>={least[0]}.{least[1]}')")


@functools.lru_cache(maxsize=64)
def _cache_argument(cls) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_argument(model) -> str:
    """The keyword a Hugging Face model's ``forward`` takes its KV cache by: ``cache`` in newer transformers 5
    releases, ``past_key_values`` before (5.17 still spells it so; an unknown keyword is swallowed silently)."""
    return _cache_argument(type(model))


def returned_cache(out):
    """The KV cache a Hugging Face forward returned (``cache`` in newer transformers 5, else
    ``past_key_values``), or None."""
    return out["cache"] if "cache" in out else out.get("past_key_values")
