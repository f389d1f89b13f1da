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
