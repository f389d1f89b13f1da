"""Test drafters: always right, always wrong, and randomly mixed, driven by the reference output."""

from __future__ import annotations

import random

from jetspec_compile.drafter import DraftTree
from jetspec_compile.tree import TreeSpec


class OracleDrafter:
    """Knows each row's reference continuation; ``mode`` decides how much of it the tree contains.

    * ``right``: a chain of the true next tokens plus wrong side branches;
    * ``wrong``: only tokens that differ from the truth at every depth;
    * ``mixed``: a random tree where each node is right with probability 1/2.
    """

    needs_hidden = False

    def __init__(self, references: list[list[int]], vocab: int, mode: str, seed: int = 0, depth: int = 6):
        self.references, self.vocab, self.mode, self.depth = references, vocab, mode, depth
        self.rng = random.Random(seed)

    def begin(self, prompts, hidden=None):
        self.history = [list(p) for p in prompts]

    def advance(self, accepted, hidden=None):
        for h, toks in zip(self.history, accepted):
            h.extend(toks)

    def _wrong(self, truth):
        tok = self.rng.randrange(self.vocab)
        return tok if tok != truth else (tok + 1) % self.vocab

    def draft(self, roots, budget):
        out = []
        for row, root in enumerate(roots):
            ref = self.references[row]
            pos = len(self.history[row]) + 1  # index in ref of the token after root
            truth = ref[pos:pos + self.depth]
            parents, tokens = [-1], [root]
            children = {}

            def add(parent, tok):
                if (parent, tok) in children or len(tokens) >= budget:
                    return children.get((parent, tok))
                children[(parent, tok)] = len(tokens)
                parents.append(parent)
                tokens.append(tok)
                return len(tokens) - 1

            if self.mode == "right":
                node = 0
                for d, tok in enumerate(truth):
                    add(node, self._wrong(tok))
                    node = add(node, tok)
                    if node is None:
                        break
            elif self.mode == "wrong":
                node = 0
                for tok in truth:
                    node = add(node, self._wrong(tok))
                    if node is None:
                        break
            else:
                for _ in range(budget):
                    parent = self.rng.randrange(len(tokens))
                    depth = 0
                    p = parent
                    while p > 0:
                        p, depth = parents[p], depth + 1
                    # the true token at this depth if the parent is on the true path
                    on_path = depth < len(truth) and self.rng.random() < 0.5
                    tok = truth[depth] if on_path else self.rng.randrange(self.vocab)
                    add(parent, tok)
            out.append(DraftTree(tuple(tokens), TreeSpec(tuple(parents))))
        return out
