import pytest
import torch

from jetspec_compile import CacheFullError
from jetspec_compile.kv_cache import StaticKVCache, compact_kv_cache


def test_compact_moves_each_rows_path_and_tolerates_overlap():
    kv = torch.arange(2 * 2 * 1 * 10 * 1, dtype=torch.float32).reshape(2, 2, 1, 10, 1)
    before = kv.clone()
    src = torch.tensor([[4, 5, 7], [4, 6, 6]])  # row 1 keeps 2 nodes, padded by repeating the last
    compact_kv_cache(kv, src, 4)
    for b in range(2):
        for k, s in enumerate(src[b].tolist()):
            assert torch.equal(kv[:, b, :, 4 + k], before[:, b, :, s])
    assert torch.equal(kv[..., :4, :], before[..., :4, :])


def test_commit_marks_holes_invalid_and_checks_room():
    cache = StaticKVCache(1, 2, 1, 1, max_length=8, dtype=torch.float32)
    cache.length = 3
    cache.commit(torch.tensor([[3, 4], [3, 3]]), torch.tensor([2, 1]), torch.tensor([[3, 4], [1, 2]]))
    assert cache.length == 5
    assert cache.valid[:, 3:5].tolist() == [[True, True], [True, False]]
    with pytest.raises(CacheFullError, match="max_cache_len=8"):
        cache.check_room(4)


def test_commit_in_place_keeps_a_chain_prefix_where_a_moving_commit_puts_it():
    """``in_place`` (the caller knows each row kept nodes 0, 1, 2, ...) skips the copy and ends in the state a
    moving commit of the same slots reaches, on every slot a row keeps."""
    gen = torch.Generator().manual_seed(0)
    moved = StaticKVCache(2, 2, 1, 3, max_length=12, dtype=torch.float32)
    moved.kv.copy_(torch.randn(moved.kv.shape, generator=gen))
    moved.length = 4
    kept = StaticKVCache(2, 2, 1, 3, max_length=12, dtype=torch.float32)
    kept.kv.copy_(moved.kv)
    kept.length = 4
    src = torch.tensor([[4, 5, 6], [4, 5, 5]])  # row 1 keeps nodes 0, 1 (padded by repeating the last)
    counts, positions = torch.tensor([3, 2]), torch.tensor([[4, 5, 6], [2, 3, 4]])
    moved.commit(src, counts, positions)
    kept.commit(src, counts, positions, in_place=True)
    assert kept.length == moved.length == 7
    assert torch.equal(kept.valid, moved.valid) and torch.equal(kept.positions, moved.positions)
    keep = moved.valid[None, :, None, :, None].expand_as(moved.kv)  # [2L, B, H, slots, D]
    assert torch.equal(kept.kv[keep], moved.kv[keep])
