"""Sources of draft tries that need no forward pass, composed by :class:`~jetspec_compile.drafter.JetSpecDrafter`.

A source keeps its own per-row state and proposes a :class:`~jetspec_compile.drafter.trie.Trie` under each row's
pending token (the shape of HF's candidate generators: a small class per source of candidates):

* :class:`~jetspec_compile.drafter.ngram.NGramDrafter` — prompt lookup: earlier continuations of the context's
  last n-grams (its ``trie``; it is also a drafter of its own);
* :class:`CorpusSource` — continuations of the context's suffix in a corpus of the target's own responses.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from .corpus import CorpusIndex
from .trie import Trie

__all__ = ["TrieSource", "CorpusSource"]


class TrieSource(Protocol):
    """What a drafter composes: per-row state fed like a drafter's, and a trie per row and step."""

    def begin(self, prompts: Sequence[Sequence[int]], hidden=None) -> None: ...

    def advance(self, accepted: Sequence[Sequence[int]], hidden=None) -> None: ...

    def trie(self, row: int, root: int, budget: int) -> Trie: ...


class CorpusSource:
    """Corpus continuations of each row's context (its last ``max_ngram - 1`` tokens and the root), up to
    ``depth`` deep, scored ``log(count / (matches + smoothing))``."""

    def __init__(self, corpus: CorpusIndex, depth: int = 16):
        self.corpus, self.depth = corpus, depth
        self._tail: list[list[int]] = []  # per row, the last committed tokens the lookup reads

    def _keep_tail(self, tokens) -> list[int]:
        keep = self.corpus.max_ngram - 1
        return [int(t) for t in list(tokens)[-keep:]] if keep else []

    def begin(self, prompts, hidden=None) -> None:
        self._tail = [self._keep_tail(p) for p in prompts]

    def advance(self, accepted, hidden=None) -> None:
        for row, toks in enumerate(accepted):
            self._tail[row] = self._keep_tail(self._tail[row] + list(toks))

    def trie(self, row: int, root: int, budget: int) -> Trie:
        """The ``budget`` best-scored continuations of row ``row``'s context and ``root``."""
        return Trie.from_tree(*self.corpus.tree(self._tail[row] + [int(root)], budget, self.depth))
