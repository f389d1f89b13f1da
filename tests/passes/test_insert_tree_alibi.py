import torch

from jetspec_compile.passes import tree_alibi_bias
from jetspec_compile.tree import TreeSpec, depths


def test_tree_alibi_bias_uses_each_key_s_own_position():
    tree = TreeSpec((-1, 0, 0, 1, 3))
    slopes = torch.tensor([0.5, 0.25])
    cache_positions = torch.tensor([[0, 0, 1, 2, 3, 0, 0, 0, 0, 0]])  # slot 0: left padding
    slots = torch.arange(5, 10)
    base = 4
    bias = tree_alibi_bias(slopes, cache_positions, slots, base + depths(tree)[None], torch.float32)
    assert bias.shape == (1, 2, 1, 10)
    key_positions = [0, 0, 1, 2, 3] + [base + int(d) for d in depths(tree)]  # node 2 sits at depth 1, not slot 7
    for h in range(2):
        assert bias[0, h, 0].tolist() == [float(slopes[h]) * p for p in key_positions]
