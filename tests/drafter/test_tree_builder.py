import itertools

import pytest
import torch

from jetspec_compile.drafter import best_first_tree
from jetspec_compile.tree import depths, path_to


def brute_force_best(logprobs, budget, width):
    """The budget-1 highest-scoring rank paths (every prefix included), by enumeration."""
    top_v, _ = logprobs.topk(width, -1)
    scores = {}
    for d in range(1, logprobs.shape[0] + 1):
        for path in itertools.product(range(width), repeat=d):
            scores[path] = sum(float(top_v[i, r]) for i, r in enumerate(path))
    return sorted(scores.values(), reverse=True)[:budget - 1]


@pytest.mark.parametrize("budget, width", [(1, 3), (5, 2), (12, 3), (20, 4)])
def test_best_first_picks_highest_cumulative_scores(budget, width):
    g = torch.Generator().manual_seed(budget)
    logprobs = torch.randn(4, 30, generator=g).log_softmax(-1)
    tokens, tree = best_first_tree(7, logprobs, budget, width)
    assert tokens[0] == 7 and len(tokens) == len(tree) == min(budget, 1 + sum(width ** d for d in range(1, 5)))
    dep = depths(tree)
    node_scores = []
    for node in range(1, len(tree)):
        path = path_to(tree, node)
        node_scores.append(sum(float(logprobs[dep[n] - 1, tokens[n]]) for n in path[1:]))
        assert tokens[node] in logprobs[dep[node] - 1].topk(width).indices.tolist()
    # log-probs are <= 0, so the best prefix-closed set equals the best individual paths
    assert sorted(node_scores, reverse=True) == pytest.approx(brute_force_best(logprobs, budget, width))


def test_width_one_is_a_chain_of_argmaxes():
    logprobs = torch.randn(5, 11).log_softmax(-1)
    tokens, tree = best_first_tree(0, logprobs, 10, 1)
    assert tree.parents == (-1, 0, 1, 2, 3, 4)
    assert list(tokens[1:]) == logprobs.argmax(-1).tolist()


def test_branches_equal_to_the_marginals_change_nothing():
    g = torch.Generator().manual_seed(3)
    logprobs = torch.randn(4, 30, generator=g).log_softmax(-1)
    same = {r: logprobs[1:] for r in range(3)}
    assert best_first_tree(5, logprobs, 16, 3, same) == best_first_tree(5, logprobs, 16, 3)


def test_path_conditioned_subtrees_draw_from_their_own_branch():
    g = torch.Generator().manual_seed(4)
    logprobs = torch.randn(4, 30, generator=g).log_softmax(-1)
    branch = torch.randn(3, 30, generator=g).log_softmax(-1)  # depths 2..4 given the best depth-1 token
    tokens, tree = best_first_tree(5, logprobs, 25, 3, {0: branch})
    dep = depths(tree)
    first = logprobs[0].argmax().item()
    for node in range(1, len(tree)):
        path = path_to(tree, node)
        table = branch[dep[node] - 2] if dep[node] > 1 and tokens[path[1]] == first else logprobs[dep[node] - 1]
        assert tokens[node] in table.topk(3).indices.tolist()
    # the best-first property holds with the mixed tables: every node outscores every absent candidate child
    scores = {}
    for node in range(1, len(tree)):
        path = path_to(tree, node)
        tables = [logprobs[0]] + [branch[d - 1] if tokens[path[1]] == first else logprobs[d] for d in range(1, 4)]
        scores[node] = sum(float(tables[dep[n] - 1][tokens[n]]) for n in path[1:])
    assert any(dep[n] > 1 and tokens[path_to(tree, n)[1]] == first for n in range(1, len(tree)))
    worst_kept = min(scores.values())
    kept_children = {(tree.parents[n], tokens[n]) for n in range(1, len(tree))}
    for node in [0] + list(range(1, len(tree))):
        d = dep[node] if node else 0
        if d >= 4:
            continue
        path = path_to(tree, node) if node else [0]
        table = logprobs[0] if d == 0 else (branch[d - 1] if tokens[path[1]] == first else logprobs[d])
        base = scores.get(node, 0.0)
        for tok in table.topk(3).indices.tolist():
            if (node, tok) not in kept_children:
                assert base + float(table[tok]) <= worst_kept + 1e-6


def _paths(tokens, tree):
    """Every node's token path from the root (the tree as a set of sequences)."""
    return {tuple(tokens[i] for i in path_to(tree, node)) for node in range(len(tree))}


def test_graft_shares_common_prefixes_and_keeps_the_budget():
    from jetspec_compile.drafter.tree_builder import graft
    from jetspec_compile.tree import TreeSpec

    # drafter tree: 9 -> {4 -> 5, 6}; lookup: 9 -> 4 -> 7 -> 8 (shares 9 -> 4)
    tokens, tree = (9, 4, 6, 5), TreeSpec((-1, 0, 0, 1))
    extra_tokens, extra = (9, 4, 7, 8), TreeSpec((-1, 0, 1, 2))
    merged, mtree = graft(tokens, tree, extra_tokens, extra, budget=6)
    assert len(merged) == 6 and _paths(merged, mtree) == _paths(tokens, tree) | {(9, 4, 7), (9, 4, 7, 8)}
    # budget 5: the drafter tree gives up its last node (5) for the lookup path
    merged, mtree = graft(tokens, tree, extra_tokens, extra, budget=5)
    assert _paths(merged, mtree) == {(9,), (9, 4), (9, 6), (9, 4, 7), (9, 4, 7, 8)}
    # every parent precedes its children and sibling tokens stay distinct (DraftTree checks both)
    from jetspec_compile.drafter import DraftTree
    DraftTree(merged, mtree)
    # an extra tree that is already inside the drafted one adds nothing
    same, stree = graft(tokens, tree, (9, 4, 5), TreeSpec((-1, 0, 1)), budget=4)
    assert len(same) == 4 and _paths(same, stree) == _paths(tokens, tree)
    # the lookup nodes come first: a prefix of the merged tree keeps them (what a smaller budget would draft)
    merged, mtree = graft(tokens, tree, extra_tokens, extra, budget=6)
    assert merged[:4] == (9, 4, 7, 8) and mtree.parents[:4] == (-1, 0, 1, 2)
    assert all(p < i for i, p in enumerate(mtree.parents))
    with pytest.raises(ValueError, match="rooted"):
        graft(tokens, tree, (3, 4), TreeSpec((-1, 0)), budget=4)


def test_lookup_nodes_draft_repeated_context_and_stay_lossless():
    import jetspec_compile as js
    from jetspec_compile.drafter import JetSpecDrafter
    from tests.drafter.test_model import tiny_drafter

    target, net = tiny_drafter()
    runtime = JetSpecDrafter(net, width=2, lookup_nodes=4)
    context = [11, 12, 13, 14, 15, 16, 17, 11, 12]
    runtime.begin([context], [torch.randn(len(context), 2 * target.config.hidden_size)])
    (tree,) = runtime.draft([13], budget=8)  # "...11 12 | 13" was followed by 14 15 16 17 before
    assert (13, 14, 15, 16, 17) in _paths(tree.tokens, tree.tree) and len(tree.tokens) <= 8
    spec = js.attach_drafter(target, JetSpecDrafter(net, width=2, lookup_nodes=4), budget=8, max_cache_len=128)
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]])
    expected = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    assert torch.equal(spec.generate(ids, max_new_tokens=30), expected)
    clone = spec.runtime_drafter()
    assert clone.lookup is not None
