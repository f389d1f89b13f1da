"""Drafters: the protocol, a training-free n-gram tree drafter, and the parallel tree drafter."""

from .ngram import NGramDrafter
from .protocol import DraftTree, Drafter

__all__ = ["DraftTree", "Drafter", "NGramDrafter"]
