"""The token tree as data.

A :class:`TreeSpec` is the *shape* of a speculation tree: node ``i`` has parent ``parents[i]``; node 0 is the
root (``parents[0] == -1``) and every other node's parent comes before it (topological order). Token ids are
kept apart from the shape (see :class:`jetspec_compile.drafter.DraftTree`), so one shape can be reused.

Pure functions derive what verification needs from the shape: depths (tree position ids are the committed
length plus the depth), the ancestor mask (node ``i`` sees node ``j`` iff ``j`` is ``i`` or one of its
ancestors) and the retrieve indices (one root-to-leaf path per row, padded with -1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

__all__ = [
    "TreeSpec",
    "ancestor_mask",
    "depths",
    "path_to",
    "retrieve_indices",
    "pad_tree",
    "tree_attention_mask",
]


@dataclass(frozen=True)
class TreeSpec:
    """Shape of a token tree given by parent indices.

    Args:
        parents: ``parents[i]`` is the index of node ``i``'s parent; ``parents[0]`` must be -1 (the root) and
            ``0 <= parents[i] < i`` for every other node.
    """

    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        parents = tuple(int(p) for p in self.parents)
        object.__setattr__(self, "parents", parents)
        if not parents:
            raise ValueError("TreeSpec needs at least one node (the root); got an empty parent list")
        if parents[0] != -1:
            raise ValueError(f"TreeSpec node 0 is the root and must have parent -1, got {parents[0]}")
        for i, p in enumerate(parents[1:], start=1):
            if not 0 <= p < i:
                raise ValueError(
                    f"TreeSpec parents must be topologically ordered: node {i} has parent {p}, "
                    f"expected 0 <= parent < {i} (list parents before their children)"
                )

    def __len__(self) -> int:
        return len(self.parents)

    @classmethod
    def chain(cls, n: int) -> "TreeSpec":
        """A linear chain of ``n`` nodes (ordinary causal decoding of ``n`` tokens)."""
        if n < 1:
            raise ValueError(f"a chain needs n >= 1 nodes, got {n}")
        return cls((-1,) + tuple(range(n - 1)))

    @classmethod
    def star(cls, n: int) -> "TreeSpec":
        """A root with ``n - 1`` children."""
        if n < 1:
            raise ValueError(f"a star needs n >= 1 nodes, got {n}")
        return cls((-1,) + (0,) * (n - 1))

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]]) -> "TreeSpec":
        """Build a tree from Medusa-style paths of child ranks, e.g. ``[(0,), (1,), (0, 0)]``.

        Each path names a node by the ranks of the children taken from the root; every prefix of a path must
        be present too. The root is implicit (the empty path).
        """
        ordered = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        index = {(): 0}
        parents = [-1]
        for path in ordered:
            if not path:
                continue
            if path[:-1] not in index:
                raise ValueError(f"path {path} has no parent path {path[:-1]} in the tree")
            index[path] = len(parents)
            parents.append(index[path[:-1]])
        return cls(tuple(parents))

    @property
    def depth(self) -> int:
        """The largest node depth (0 for a lone root)."""
        return int(max(_depths(self.parents)))


def _depths(parents: Sequence[int]) -> list[int]:
    out = [0] * len(parents)
    for i, p in enumerate(parents):
        if p >= 0:
            out[i] = out[p] + 1
    return out


def depths(tree: TreeSpec) -> torch.Tensor:
    """Depth of every node, root 0. Shape ``[N]``, int64."""
    return torch.tensor(_depths(tree.parents), dtype=torch.long)


def ancestor_mask(tree: TreeSpec) -> torch.Tensor:
    """``mask[i, j]`` is True iff node ``j`` is node ``i`` or one of its ancestors. Shape ``[N, N]``, bool."""
    n = len(tree)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(tree.parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def path_to(tree: TreeSpec, node: int) -> list[int]:
    """Node indices from the root to ``node`` (both included)."""
    if not 0 <= node < len(tree):
        raise IndexError(f"node {node} is not in a tree of {len(tree)} nodes")
    path = []
    while node >= 0:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


def retrieve_indices(tree: TreeSpec) -> torch.Tensor:
    """One row per leaf: the node indices of its root-to-leaf path, right-padded with -1. ``[leaves, depth+1]``."""
    has_child = set(p for p in tree.parents if p >= 0)
    leaves = [i for i in range(len(tree)) if i not in has_child]
    paths = [path_to(tree, leaf) for leaf in leaves]
    width = max(len(p) for p in paths)
    return torch.tensor([p + [-1] * (width - len(p)) for p in paths], dtype=torch.long)


def pad_tree(tree: TreeSpec, n: int) -> TreeSpec:
    """Pad ``tree`` to ``n`` nodes with extra children of the root (they are verified but never accepted)."""
    if len(tree) > n:
        raise ValueError(f"tree has {len(tree)} nodes but the verify graph takes at most {n}; raise the budget")
    return TreeSpec(tree.parents + (0,) * (n - len(tree)))


def tree_attention_mask(
    tree_mask: torch.Tensor,
    cache_valid: torch.Tensor,
    cache_positions: torch.Tensor,
    write_slots: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive attention mask ``[B, 1, N, L]`` of tree nodes over cache slots (0 visible, dtype-min hidden).

    tree_mask: [B, N, N] bool; cache_valid: [B, L] bool; cache_positions: [B, L] int64; write_slots: [N] int64
    (cache slots of the N nodes); positions: [B, N] int64 (tree position ids).
    """
    b, n, _ = tree_mask.shape
    length = cache_valid.shape[1]
    visible = cache_valid[:, None, :].expand(b, n, length)  # [B, N, L]: the committed prefix
    visible = visible.index_copy(2, write_slots, tree_mask)  # tree columns: ancestors and self only
    if window is not None:
        key_positions = cache_positions.index_copy(1, write_slots, positions)  # [B, L]
        visible = visible & ((positions[:, :, None] - key_positions[:, None, :]) < window)
    zero = torch.zeros((), dtype=dtype, device=tree_mask.device)
    hidden = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=tree_mask.device)
    return torch.where(visible, zero, hidden)[:, None]
