"""The speculative runtime: the tree verifier and the decoding loop."""

from .verifier import TreeVerifier

__all__ = ["TreeVerifier"]
