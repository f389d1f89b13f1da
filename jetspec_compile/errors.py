"""Exceptions raised by jetspec_compile, each naming what is wrong and how to fix it."""


class JetSpecError(Exception):
    """Base class of the errors this package raises on purpose."""


class UnsupportedModelError(JetSpecError, ValueError):
    """The model (or a part of its graph) cannot be rewritten for tree verification."""


class CacheFullError(JetSpecError, RuntimeError):
    """The static KV cache has no room for the requested tokens."""
