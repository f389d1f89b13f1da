"""One token-trie type for every source of draft nodes.

The drafter network's best-first tree, prompt-lookup continuations and corpus continuations are all tries rooted
at the pending token. :class:`Trie` builds them (a child per distinct token under a parent), merges them (a node
in both keeps the larger score) and cuts them to a budget, either by score (:meth:`Trie.best`: nodes in
decreasing score, ties shallower first) or in a given priority order (:meth:`Trie.ordered`). Scores never rise
from parent to child (they are path log-probabilities or log shares), so a budget's best nodes always include
their parents, and a prefix of the result is what a smaller budget would have kept: the budget controller reads
``τ`` of smaller budgets from such prefixes.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from ..tree import TreeSpec

__all__ = ["Trie"]


class Trie:
    """A token trie rooted at ``root``: node 0 is the root; parents come before children.

    Attributes:
        tokens, parents, scores, depths: per node (root: parent -1, score 0, depth 0).
    """

    def __init__(self, root: int):
        self.tokens: list[int] = [int(root)]
        self.parents: list[int] = [-1]
        self.scores: list[float] = [0.0]
        self.depths: list[int] = [0]
        self._children: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def root(self) -> int:
        return self.tokens[0]

    def child(self, parent: int, token: int) -> int | None:
        return self._children.get((parent, int(token)))

    def add(self, parent: int, token: int, score: float = 0.0) -> int:
        """The node for ``token`` under ``parent``: an existing one (its score becomes the larger of the two) or a
        new one."""
        key = (parent, int(token))
        node = self._children.get(key)
        if node is not None:
            self.scores[node] = max(self.scores[node], float(score))
            return node
        node = self._children[key] = len(self.tokens)
        self.tokens.append(key[1])
        self.parents.append(parent)
        self.scores.append(float(score))
        self.depths.append(self.depths[parent] + 1)
        return node

    def add_path(self, tokens: Iterable[int], limit: int | None = None) -> list[int]:
        """Insert a path from the root, sharing existing prefixes; stop where a new node would exceed ``limit``
        nodes. Returns the path's nodes."""
        node, path = 0, []
        for tok in tokens:
            nxt = self.child(node, tok)
            if nxt is None:
                if limit is not None and len(self) >= limit:
                    break
                nxt = self.add(node, tok)
            path.append(nxt)
            node = nxt
        return path

    @classmethod
    def from_tree(cls, tokens: Sequence[int], tree: TreeSpec, scores: Sequence[float] | None = None) -> "Trie":
        """The trie of a drafted tree (node ``i`` of the tree is node ``i`` of the trie: siblings are distinct)."""
        trie = cls(tokens[0])
        for node in range(1, len(tokens)):
            trie.add(tree.parents[node], tokens[node], 0.0 if scores is None else scores[node])
        return trie

    def merge(self, other: "Trie", limit: int | None = None) -> dict[int, int]:
        """Add ``other``'s nodes (same root); shared nodes keep the larger score. With ``limit``, new nodes are
        added only while the trie has fewer than ``limit`` nodes (a node whose parent was not added is skipped).
        Returns ``{other's node: this trie's node}`` for the nodes placed."""
        if other.root != self.root:
            raise ValueError(f"cannot merge a trie rooted at {other.root} into one rooted at {self.root}")
        where = {0: 0}
        for node in range(1, len(other)):
            parent = where.get(other.parents[node])
            if parent is None:
                continue
            existing = self.child(parent, other.tokens[node])
            if existing is not None or limit is None or len(self) < limit:
                where[node] = self.add(parent, other.tokens[node], other.scores[node])
        return where

    def new_nodes(self, other: "Trie") -> int:
        """How many of ``other``'s nodes this trie lacks (all of them reachable from shared prefixes)."""
        count, where = 0, {0: 0}
        for node in range(1, len(other)):
            parent = where.get(other.parents[node])
            existing = None if parent is None or parent < 0 else self.child(parent, other.tokens[node])
            if existing is None:
                count += 1
                where[node] = -1  # not in this trie: its children are new as well
            else:
                where[node] = existing
        return count

    def ordered(self, order: Sequence[int]) -> tuple[tuple[int, ...], TreeSpec]:
        """``(tokens, tree)`` of the nodes ``order`` (root first, every parent before its children), renumbered."""
        new = {old: k for k, old in enumerate(order)}
        return (tuple(self.tokens[i] for i in order),
                TreeSpec(tuple(-1 if i == 0 else new[self.parents[i]] for i in order)))

    def best(self, budget: int, with_scores: bool = False):
        """The ``budget`` best nodes (root included) in decreasing score, ties shallower first:
        ``(tokens, tree)``, and with ``with_scores`` their scores."""
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        scores = list(self.scores)
        for i in range(1, len(scores)):  # rounding in a running sum must not put a child before its parent
            scores[i] = min(scores[i], scores[self.parents[i]])
        order = [0] + sorted(range(1, len(self)), key=lambda i: (-scores[i], self.depths[i], i))[:budget - 1]
        tokens, tree = self.ordered(order)
        return (tokens, tree, [scores[i] for i in order]) if with_scores else (tokens, tree)
