import pytest
import torch

from jetspec_compile.tree import TreeSpec, ancestor_mask, depths, pad_tree, path_to, retrieve_indices


def test_ancestor_mask_and_depths_of_small_tree():
    tree = TreeSpec((-1, 0, 0, 1, 3))
    mask = ancestor_mask(tree)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    for i, anc in enumerate([[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 3, 4]]):
        expected[i, anc] = True
    assert torch.equal(mask, expected)
    assert depths(tree).tolist() == [0, 1, 1, 2, 3]
    assert tree.depth == 3


def test_retrieve_indices_lists_every_leaf_path():
    tree = TreeSpec((-1, 0, 0, 1, 3))
    assert retrieve_indices(tree).tolist() == [[0, 2, -1, -1], [0, 1, 3, 4]]
    assert path_to(tree, 4) == [0, 1, 3, 4]


def test_chain_star_and_paths():
    assert ancestor_mask(TreeSpec.chain(4)).equal(torch.ones(4, 4, dtype=torch.bool).tril())
    assert depths(TreeSpec.star(4)).tolist() == [0, 1, 1, 1]
    tree = TreeSpec.from_paths([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)])
    assert tree.parents == (-1, 0, 0, 1, 1, 3)


@pytest.mark.parametrize("parents, message", [
    ((), "at least one node"),
    ((0,), "parent -1"),
    ((-1, 1), "topologically ordered"),
    ((-1, 0, 5), "topologically ordered"),
    ((-1, -1), "topologically ordered"),
])
def test_bad_trees_are_refused(parents, message):
    with pytest.raises(ValueError, match=message):
        TreeSpec(parents)


def test_from_paths_needs_parent_paths():
    with pytest.raises(ValueError, match="no parent path"):
        TreeSpec.from_paths([(0, 0)])


def test_pad_tree():
    tree = pad_tree(TreeSpec.chain(3), 5)
    assert tree.parents == (-1, 0, 1, 0, 0)
    with pytest.raises(ValueError, match="raise the budget"):
        pad_tree(TreeSpec.chain(6), 5)
