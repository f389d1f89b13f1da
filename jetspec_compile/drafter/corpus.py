"""Retrieval drafting: continuations of the context's suffix in a corpus of the target's own responses.

A target repeats itself across prompts far more than within one ("This function uses a generator expression
to ...", "To find the total, we need to ..."): phrases that a small drafter predicts a token or two at a time.
:class:`CorpusIndex` holds the responses of the self-distillation data (training prompts only) as one token
array and its positions sorted by the tokens that follow them, so the longest suffix of the context that occurs
in the corpus is found by binary search. Its occurrences' continuations form a trie; a node's score is the
smoothed share of occurrences that continue along its path, ``log(count / (matches + smoothing))``, comparable
to the drafter's path log-probabilities, so the two trees are merged by score within one budget
(:func:`~jetspec_compile.drafter.tree_builder.merge_scored`). No forward pass: the lookup is a few dozen
comparisons per step.

Saved next to a drafter as ``corpus.safetensors`` (int32 tokens, sequences separated by ``-1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..io import atomic_file
from ..tree import TreeSpec
from .trie import Trie

__all__ = ["CorpusIndex", "CORPUS_FILE"]

CORPUS_FILE = "corpus.safetensors"
DEFAULT_MAX_NGRAM = 6  # the longest context suffix matched


def _split(tokens: np.ndarray) -> list[np.ndarray]:
    """The sequences of a flat token array in which ``-1`` ends each one (empty ones dropped)."""
    return [s[s >= 0] for s in np.split(tokens, np.flatnonzero(tokens < 0) + 1) if (s >= 0).any()]


class CorpusIndex:
    """Suffix lookup over token sequences.

    Args:
        sequences: token id lists (the target's responses, each optionally led by the end of its prompt).
        max_ngram / min_ngram: the longest and shortest context suffix matched (longest first).
        max_matches: occurrences read per lookup (evenly spaced over all of them when there are more).
        smoothing: added to the match count in a node's score (a single occurrence is not a certainty).
    """

    def __init__(self, sequences: Sequence[Sequence[int]], max_ngram: int = DEFAULT_MAX_NGRAM, min_ngram: int = 2,
                 max_matches: int = 64, smoothing: float = 4.0):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_matches < 1 or smoothing < 0:
            raise ValueError(f"need max_matches >= 1 and smoothing >= 0, got {max_matches}, {smoothing}")
        parts = []
        for seq in sequences:
            if len(seq):
                arr = np.asarray(seq, dtype=np.int64)
                if arr.min() < 0:
                    raise ValueError(f"token ids must be >= 0, got {int(arr.min())}")
                parts += [arr, np.array([-1], dtype=np.int64)]
        if not parts:
            raise ValueError("a corpus needs at least one non-empty sequence")
        flat = np.concatenate(parts)
        if flat.max() >= 2 ** 31:
            raise ValueError(f"token id {int(flat.max())} does not fit the corpus's int32 storage")
        self.tokens = flat.astype(np.int32)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_matches, self.smoothing = max_matches, smoothing
        starts = np.flatnonzero(self.tokens >= 0)
        padded = np.concatenate([self.tokens, np.full(max_ngram, -1, dtype=np.int32)])
        windows = np.stack([padded[starts + k] for k in range(max_ngram)], axis=1)  # [N, max_ngram]
        order = np.lexsort(windows.T[::-1])  # lexicographic by the window's first token, then the next...
        self._starts = starts[order]
        self._keys = windows[order]

    def __len__(self) -> int:
        return len(self._starts)  # one entry per corpus token

    def options(self) -> dict:
        """The lookup settings this index was built with (the keyword arguments of the constructor)."""
        return dict(max_ngram=self.max_ngram, min_ngram=self.min_ngram, max_matches=self.max_matches,
                    smoothing=self.smoothing)

    def sequences(self) -> list[np.ndarray]:
        """The indexed token sequences, in the order they were given."""
        return [s.astype(np.int64) for s in _split(self.tokens)]

    def merged(self, sequences: Sequence[Sequence[int]]) -> "CorpusIndex":
        """A new index of this one's sequences followed by those of ``sequences`` not already in it (same
        settings): how a fine-tuned drafter keeps its corpus and adds its new data's responses."""
        mine = self.sequences()
        seen = {tuple(s.tolist()) for s in mine}
        new = []
        for seq in sequences:
            key = tuple(int(t) for t in seq)
            if key and key not in seen:
                seen.add(key)
                new.append(key)
        return CorpusIndex(mine + [list(k) for k in new], **self.options())

    def _bound(self, query: tuple[int, ...], upper: bool) -> int:
        n, lo, hi = len(query), 0, len(self._starts)
        while lo < hi:
            mid = (lo + hi) // 2
            key = tuple(self._keys[mid, :n].tolist())
            if key < query or (upper and key == query):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def matches(self, context: Sequence[int]) -> tuple[int, np.ndarray]:
        """``(n, positions)``: the longest suffix of ``context`` (``n`` tokens, ``min_ngram <= n``) found in the
        corpus and the corpus positions right after its occurrences (at most ``max_matches``); ``(0, [])`` if
        none."""
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            query = tuple(int(t) for t in context[-n:])
            lo = self._bound(query, upper=False)
            hi = self._bound(query, upper=True)
            if hi > lo:
                picked = np.linspace(lo, hi - 1, num=min(self.max_matches, hi - lo)).round().astype(np.int64)
                return n, self._starts[np.unique(picked)] + n
        return 0, np.zeros(0, dtype=np.int64)

    def trie(self, context: Sequence[int], depth: int) -> Trie:
        """The continuation trie of ``context`` (whose last token is the root), at most ``depth`` below the root;
        a node scores ``log(count / (matches + smoothing))``."""
        n, after = self.matches(context)
        trie, counts = Trie(int(context[-1])), [len(after)]
        for p in after.tolist():
            node = 0
            for tok in self.tokens[p:p + depth].tolist():
                if tok < 0:
                    break
                node = trie.add(node, tok)
                counts += [0] * (len(trie) - len(counts))
                counts[node] += 1
        total = len(after) + self.smoothing
        trie.scores = [0.0] + [float(np.log(c / total)) for c in counts[1:]]
        return trie

    def tree(self, context: Sequence[int], nodes: int, depth: int) -> tuple[tuple[int, ...], TreeSpec, list[float]]:
        """:meth:`trie` cut to its ``nodes`` best-scored nodes (root included; a child never outscores its parent,
        ties go to the shallower node, so parents come first): ``(tokens, tree, scores)``; ``scores[0] = 0``. A
        path of ``nodes`` nodes reaches at most ``nodes - 1`` below the root, so the trie is built no deeper."""
        nodes = max(1, nodes)
        return self.trie(context, min(depth, nodes - 1)).best(nodes, with_scores=True)

    def save(self, path: str | Path) -> Path:
        """Write the corpus tokens to ``path`` (a ``.safetensors`` file), atomically."""
        path = Path(path)
        with atomic_file(path) as tmp:
            save_file({"tokens": torch.from_numpy(self.tokens.copy())}, str(tmp), metadata={"format": "jetspec-corpus"})
        return path

    @classmethod
    def load(cls, path: str | Path, vocab_size: int | None = None, **options) -> "CorpusIndex":
        """Read a corpus written by :meth:`save`; ``vocab_size`` checks that its tokens fit the target."""
        path = Path(path)
        try:
            tokens = load_file(str(path))["tokens"].numpy()
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise ValueError(f"{path} is not a readable corpus file ({err}); rebuild it with "
                             "`jetspec-compile train-drafter` or delete it") from err
        if tokens.ndim != 1 or (vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size):
            raise ValueError(f"{path} holds token ids outside the target's vocabulary of {vocab_size}: it was "
                             "built for another model; rebuild it from this target's data")
        return cls(_split(tokens), **options)

    @classmethod
    def from_records(cls, records: Sequence[dict], prompt_tail: int | None = None, **options) -> "CorpusIndex":
        """A corpus of self-distillation records' responses, each led by the last ``prompt_tail`` tokens of its
        prompt (default: ``max_ngram``; the chat template's "assistant" header, so first tokens match too)."""
        tail = options.get("max_ngram", DEFAULT_MAX_NGRAM) if prompt_tail is None else prompt_tail
        return cls([(list(r["prompt_ids"][-tail:]) if tail else []) + list(r["response_ids"])
                    for r in records], **options)
