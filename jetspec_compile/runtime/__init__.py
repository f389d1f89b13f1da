"""The speculative runtime: the tree verifier and the decoding loop."""

from .verifier import TreeVerifier, build_verify_step

__all__ = ["TreeVerifier", "build_verify_step"]
