"""A training-free drafter: prompt lookup, extended to a tree.

The context (prompt plus everything generated) is indexed by n-grams. To draft, the last ``n`` tokens (for
``n`` from ``max_ngram`` down to ``min_ngram``) are looked up; every earlier occurrence contributes the tokens
that followed it, most recent first, as a branch of a trie rooted at the pending token, until the node budget
is spent. Repetitive text (code edits, quoting the prompt) then gets long accepted paths with no training.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from ..tree import TreeSpec
from .protocol import DraftTree
from .trie import Trie

__all__ = ["NGramDrafter"]


class _Row:
    def __init__(self, tokens: Sequence[int], max_ngram: int):
        self.tokens: list[int] = []
        self.index: dict[tuple, list[int]] = defaultdict(list)  # n-gram -> end positions (exclusive)
        self.max_ngram = max_ngram
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for tok in tokens:
            self.tokens.append(int(tok))
            end = len(self.tokens)
            for n in range(1, self.max_ngram + 1):
                if end >= n:
                    self.index[tuple(self.tokens[end - n:end])].append(end)


class NGramDrafter:
    """Prompt-lookup tree drafter.

    Args:
        max_ngram / min_ngram: n-gram lengths matched against the context, longest first.
        continuation: how many tokens each match contributes (the depth of its branch).
        max_matches: how many earlier occurrences are turned into branches.
    """

    needs_hidden = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, continuation: int = 10, max_matches: int = 8):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.continuation, self.max_matches = continuation, max_matches
        self.rows: list[_Row] = []

    def begin(self, prompts, hidden=None) -> None:
        self.rows = [_Row(p, self.max_ngram) for p in prompts]

    def advance(self, accepted, hidden=None) -> None:
        for row, toks in zip(self.rows, accepted):
            row.extend(toks)

    def _continuations(self, row: _Row, root: int) -> list[list[int]]:
        context = row.tokens + [root]
        out, used = [], set()
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(context) < n:
                continue
            key = tuple(context[-n:])
            ends = row.index.get(key, [])
            # positions in row.tokens where the n-gram ends; the root itself is not in row.tokens
            for end in reversed(ends):
                if end in used or end >= len(row.tokens):
                    continue
                used.add(end)
                out.append(row.tokens[end:end + self.continuation])
                if len(out) >= self.max_matches:
                    return out
        return out

    def trie(self, row: int, root: int, budget: int) -> Trie:
        """Row ``row``'s continuation trie under ``root``: earlier continuations of the context's last n-grams,
        most recent and longest match first, until ``budget`` nodes."""
        trie = Trie(root)
        for cont in self._continuations(self.rows[row], int(root)):
            trie.add_path(cont, limit=budget)
            if len(trie) >= budget:
                break
        return trie

    def draft(self, roots: Sequence[int], budget: int) -> list[DraftTree]:
        trees = []
        for row, root in enumerate(roots):
            trie = self.trie(row, int(root), budget)
            trees.append(DraftTree(tuple(trie.tokens), TreeSpec(tuple(trie.parents))))
        return trees
