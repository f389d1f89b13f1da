"""The static, preallocated KV cache of a tree-verify graph, and accepted-path compaction.

Layout: one tensor ``kv`` ``[2 * layers, B, H_kv, L, D]`` (keys of layer ``l`` at ``2l``, values at
``2l + 1``), plus per-slot bookkeeping ``valid`` ``[B, L]`` and ``positions`` ``[B, L]``. All rows share one
write pointer ``length``: a step writes its ``N`` nodes at slots ``length .. length + N - 1``; ``compact``
then moves each row's accepted path to the slots right after the prefix. Rows that accepted fewer tokens than
the longest leave holes, which stay invalid (masked out), so per-row lengths never need a ragged layout.
"""

from __future__ import annotations

import torch

from .errors import CacheFullError

__all__ = ["StaticKVCache", "compact_kv_cache"]


def compact_kv_cache(kv: torch.Tensor, src_slots: torch.Tensor, dst_start: int) -> None:
    """Copy, in place, slots ``src_slots`` ``[B, A]`` of every row to slots ``dst_start .. dst_start + A - 1``.

    kv: [2 * layers, B, H_kv, L, D]. Sources are gathered before anything is written, so overlapping source
    and destination ranges are safe.
    """
    layers, batch, heads, _, dim = kv.shape
    count = src_slots.shape[1]
    index = src_slots[None, :, None, :, None].expand(layers, batch, heads, count, dim)
    kv[:, :, :, dst_start:dst_start + count] = kv.gather(3, index)


class StaticKVCache:
    """Preallocated KV cache with slot bookkeeping for tree verification."""

    def __init__(self, num_layers: int, batch_size: int, heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.max_length = max_length
        self.kv = torch.zeros(2 * num_layers, batch_size, heads, max_length, head_dim, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)
        self.length = 0  # shared write pointer: slots < length are committed (or holes / padding)
        self.defragmentations = 0

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    def reset(self) -> None:
        self.valid.zero_()
        self.positions.zero_()
        self.length = 0
        self.defragmentations = 0

    def room(self) -> int:
        return self.max_length - self.length

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_length:
            raise CacheFullError(
                f"KV cache full: {self.length} slots committed + {n} new > max_cache_len={self.max_length}; "
                "create the model with a larger max_cache_len or generate fewer tokens"
            )

    def views(self, length: int) -> list[torch.Tensor]:
        """Per-layer ``[B, H_kv, length, D]`` views of the first ``length`` slots (k0, v0, k1, v1, ...)."""
        return [self.kv[i, :, :, :length] for i in range(self.kv.shape[0])]

    def commit(self, src_slots: torch.Tensor, counts: torch.Tensor, positions: torch.Tensor, *,
               in_place: bool = False) -> None:
        """Compact accepted slots and mark them committed.

        src_slots: [B, A] cache slots of each row's accepted nodes in order (rows with fewer than A are padded
        with any valid slot); counts: [B] how many of them each row keeps; positions: [B, A] their position ids.
        in_place: the caller knows every row's kept slots already are ``length .. length + count - 1`` in order
        (a chain prefix, always so in plain decoding), so there is nothing to move.
        """
        count = src_slots.shape[1]
        self.check_room(count)
        if not in_place:
            compact_kv_cache(self.kv, src_slots, self.length)
        keep = torch.arange(count, device=counts.device)[None, :] < counts[:, None]  # [B, A]
        self.valid[:, self.length:self.length + count] = keep
        self.positions[:, self.length:self.length + count] = positions
        self.length += count

    def defragment(self) -> None:
        """Squeeze out holes: move each row's committed slots to the right end of ``0 .. m - 1`` (``m`` = the
        most committed slots of any row), like left padding, and reset the write pointer to ``m``."""
        valid = self.valid[:, :self.length]
        counts = valid.sum(1).tolist()
        width = max(counts)
        src = torch.zeros(self.batch_size, width, dtype=torch.long, device=self.valid.device)
        keep = torch.zeros(self.batch_size, width, dtype=torch.bool, device=self.valid.device)
        for row, count in enumerate(counts):
            slots = valid[row].nonzero()[:, 0]
            src[row, width - count:] = slots
            keep[row, width - count:] = True
        positions = self.positions.gather(1, src)
        compact_kv_cache(self.kv, src, 0)
        self.valid.zero_()
        self.valid[:, :width] = keep
        self.positions[:, :width] = positions
        self.length = width
        self.defragmentations += 1
