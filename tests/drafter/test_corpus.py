"""Retrieval drafting from a corpus of the target's own responses: lookup, scores, merging, files, losslessness."""

import math
import random

import pytest
import torch

from jetspec_compile.drafter import CorpusIndex, DraftTree, JetSpecDrafter, load_corpus, save_drafter
from jetspec_compile.drafter.corpus import CORPUS_FILE
from jetspec_compile.drafter.tree_builder import best_first_tree, merge_scored
from jetspec_compile.tree import TreeSpec


def _paths(tokens, tree):
    out = set()
    for i in range(len(tokens)):
        path, node = [], i
        while node >= 0:
            path.append(tokens[node])
            node = tree.parents[node]
        out.add(tuple(reversed(path)))
    return out


def _brute_matches(seqs, context, max_ngram, min_ngram):
    """Longest suffix of ``context`` occurring in any sequence, and what follows each occurrence (<= 4 tokens)."""
    for n in range(min(max_ngram, len(context)), min_ngram - 1, -1):
        q = list(context[-n:])
        follow = [tuple(s[i + n:i + n + 4]) for s in seqs for i in range(len(s) - n + 1) if s[i:i + n] == q]
        if follow:
            return n, sorted(follow)
    return 0, []


def test_lookup_finds_the_longest_suffix_and_every_occurrence():
    rng = random.Random(0)
    seqs = [[rng.randrange(5) for _ in range(rng.randrange(1, 30))] for _ in range(40)]
    corpus = CorpusIndex(seqs, max_ngram=4, min_ngram=1, max_matches=10_000)
    flat = corpus.tokens.tolist()
    for _ in range(200):
        context = [rng.randrange(6) for _ in range(rng.randrange(1, 8))]  # token 5 never occurs
        n, after = corpus.matches(context)
        want_n, want = _brute_matches(seqs, context, 4, 1)
        assert n == want_n
        got = []
        for p in after.tolist():  # a continuation ends at its sequence's end (the -1 separator)
            cont = flat[p:p + 4]
            got.append(tuple(cont[:cont.index(-1)] if -1 in cont else cont))
        assert sorted(got) == want


def test_trie_scores_are_smoothed_shares_and_parents_come_first():
    corpus = CorpusIndex([[1, 2, 3, 4, 5], [9, 2, 3, 4, 7], [2, 3, 8], [2, 3, 4, 5]], max_ngram=3, min_ngram=1,
                         smoothing=1.0)
    tokens, tree, scores = corpus.tree([0, 2, 3], nodes=10, depth=4)
    assert tokens[0] == 3 and scores[0] == 0.0
    by_path = {}
    for i in range(len(tokens)):
        path, node = [], i
        while node >= 0:
            path.append(tokens[node])
            node = tree.parents[node]
        by_path[tuple(reversed(path))] = scores[i]
    matches = 4  # "2 3" occurs four times
    assert by_path[(3, 4)] == pytest.approx(math.log(3 / (matches + 1)))
    assert by_path[(3, 4, 5)] == pytest.approx(math.log(2 / (matches + 1)))
    assert by_path[(3, 8)] == pytest.approx(math.log(1 / (matches + 1)))
    assert all(p < i for i, p in enumerate(tree.parents))
    assert all(scores[i] <= scores[p] for i, p in enumerate(tree.parents) if p >= 0)
    # a node budget keeps the best-scored nodes, and the depth cap holds
    small, small_tree, _ = corpus.tree([0, 2, 3], nodes=3, depth=4)
    assert _paths(small, small_tree) == {(3,), (3, 4), (3, 4, 5)}
    shallow, shallow_tree, _ = corpus.tree([0, 2, 3], nodes=10, depth=1)
    assert max(len(p) for p in _paths(shallow, shallow_tree)) == 2
    # nothing matches: the root alone
    assert corpus.tree([42, 43], nodes=5, depth=4)[0] == (43,)


def test_a_node_budget_builds_no_deeper_than_it_can_keep_and_keeps_the_same_tree():
    """``tree`` builds its trie only ``nodes - 1`` deep (a cost cut): its nodes, order and scores must equal those of
    the full-depth trie cut to the same budget."""
    rng = random.Random(1)
    seqs = [[rng.randrange(6) for _ in range(rng.randrange(1, 40))] for _ in range(60)]
    corpus = CorpusIndex(seqs, max_ngram=3, min_ngram=1)
    for _ in range(100):
        context = [rng.randrange(6) for _ in range(rng.randrange(1, 6))]
        for nodes in (1, 2, 3, 5, 8):
            assert corpus.tree(context, nodes, 16) == corpus.trie(context, 16).best(nodes, with_scores=True)


def test_merge_keeps_the_best_nodes_of_both_trees_within_the_budget():
    rng = random.Random(1)
    for trial in range(50):
        lp = torch.log_softmax(torch.randn(4, 6) * 2, -1)
        a = best_first_tree(0, lp, rng.randrange(2, 12), 3, with_scores=True)
        corpus = CorpusIndex([[rng.randrange(1, 6) for _ in range(12)] for _ in range(6)], max_ngram=2,
                             min_ngram=1, smoothing=0.5)
        b = corpus.tree([rng.randrange(1, 6), 0], nodes=rng.randrange(1, 10), depth=5)
        b = ((0,) + b[0][1:], b[1], b[2])  # same root as a
        budget = rng.randrange(1, 14)
        tokens, tree = merge_scored(a, b, budget)
        DraftTree(tokens, tree)  # parents before children, distinct siblings
        assert len(tokens) <= budget
        # every node scores the better of its scores in a and b; the kept nodes are the best of the union
        score = {}
        for toks, t, sc in (a, b):
            for i in range(1, len(toks)):
                path, node = [], i
                while node >= 0:
                    path.append(toks[node])
                    node = t.parents[node]
                key = tuple(reversed(path))
                score[key] = max(score.get(key, -math.inf), sc[i])
        kept = _paths(tokens, tree) - {(0,)}
        assert kept <= set(score) and len(kept) == min(budget - 1, len(score))
        if kept and len(kept) < len(score):
            assert min(score[k] for k in kept) >= max(score[k] for k in set(score) - kept) - 1e-6
        # a prefix is what a smaller budget keeps
        shorter, shorter_tree = merge_scored(a, b, max(1, budget - 2))
        assert shorter == tokens[:len(shorter)]
    # a child scored a rounding error above its parent (a running float sum) still comes after it
    noisy = ((0, 5, 6), TreeSpec((-1, 0, 1)), [0.0, -1e-7, -1e-8])
    tokens, tree = merge_scored(noisy, ((0, 7), TreeSpec((-1, 0)), [0.0, -0.5]), budget=2)
    assert tokens == (0, 5) and tree.parents == (-1, 0)
    with pytest.raises(ValueError, match="rooted"):
        merge_scored(((1, 2), TreeSpec((-1, 0)), [0.0, -1.0]), ((3,), TreeSpec((-1,)), [0.0]), 4)


def test_corpus_file_roundtrip_and_clear_errors(tmp_path):
    corpus = CorpusIndex([[1, 2, 3], [4, 5], [6]])
    path = corpus.save(tmp_path / CORPUS_FILE)
    again = CorpusIndex.load(path)
    assert again.tokens.tolist() == corpus.tokens.tolist() and len(again) == 6
    assert [p.name for p in tmp_path.iterdir()] == [CORPUS_FILE]  # no temporary file left behind
    with pytest.raises(ValueError, match="another model"):
        CorpusIndex.load(path, vocab_size=6)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="not a readable corpus"):
        CorpusIndex.load(path)
    with pytest.raises(ValueError, match="non-empty"):
        CorpusIndex([[], []])
    with pytest.raises(ValueError, match=">= 0"):
        CorpusIndex([[1, -1, 2]])
    with pytest.raises(ValueError, match="min_ngram"):
        CorpusIndex([[1]], max_ngram=2, min_ngram=3)


def test_saving_a_drafter_keeps_or_replaces_its_corpus(tmp_path):
    from tests.drafter.test_model import tiny_drafter

    target, net = tiny_drafter()
    save_drafter(net, tmp_path / "d", corpus=CorpusIndex([[1, 2, 3]]))
    save_drafter(net, tmp_path / "d")  # re-saved without a corpus: the one there stays
    assert load_corpus(tmp_path / "d", target).tokens.tolist() == [1, 2, 3, -1]
    save_drafter(net, tmp_path / "d", corpus=CorpusIndex([[7, 8]]))
    assert load_corpus(tmp_path / "d", target).tokens.tolist() == [7, 8, -1]
    save_drafter(net, tmp_path / "e")
    assert load_corpus(tmp_path / "e", target) is None


def test_corpus_continuations_are_drafted_accepted_and_lossless():
    """A corpus holding the target's own greedy continuation makes long accepted paths from an untrained
    drafter (which alone accepts almost nothing), and the output stays identical to greedy decoding."""
    import jetspec_compile as js
    from tests.drafter.test_model import tiny_drafter

    target, net = tiny_drafter()
    prompt = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False)
    response = expected[0, prompt.shape[1]:].tolist()
    taus = {}
    for name, corpus in (("none", None), ("own", CorpusIndex.from_records(
            [{"prompt_ids": prompt[0].tolist(), "response_ids": response}]))):
        spec = js.attach_drafter(target, JetSpecDrafter(net, width=2, lookup_nodes=0, corpus=corpus), budget=8,
                                 max_cache_len=128, fallback=False)
        assert torch.equal(spec.generate(prompt, max_new_tokens=40), expected)
        hist = spec.last_stats["acceptance_histogram"]
        taus[name] = sum(k * v for k, v in hist.items()) / sum(hist.values())
    assert taus["own"] > 4 and taus["own"] > 2 * taus["none"], taus
    # a corpus of unrelated text changes nothing about the output either
    other = CorpusIndex([list(range(1, 60)), [7, 7, 7, 7]])
    spec = js.attach_drafter(target, JetSpecDrafter(net, width=2, corpus=other), budget=8, max_cache_len=128)
    assert torch.equal(spec.generate(prompt, max_new_tokens=40), expected)
