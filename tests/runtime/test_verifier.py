"""Tree verification numerics: every node's logits equal eager HF decoding of its root-to-node path."""

import functools
import random

import pytest
import torch

from jetspec_compile import CacheFullError, TreeSpec, TreeVerifier, UnsupportedModelError
from jetspec_compile.runtime import prefill as prefill_paths
from jetspec_compile.tree import path_to
from tests.families import FAMILIES, VOCAB, make_model
from tests.reference import left_pad, path_logits, random_tree, sequence_logits

BUDGET = 64
TOL = dict(atol=1e-4, rtol=1e-4)


@functools.lru_cache(maxsize=None)
def verifier(family: str, batch: int) -> TreeVerifier:
    return TreeVerifier(make_model(family), max_cache_len=256, batch_size=batch, budget=BUDGET,
                        run_checks=True)




@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batch", [1, 2])
def test_tree_logits_match_eager_path_decoding(family, batch):
    rng = random.Random(hash((family, batch)) & 0xFFFF)
    v = verifier(family, batch)
    model = v.model
    # Prefixes longer than the tiny sliding windows (8) and of different lengths per row (left padding).
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(21 - 7 * i)] for i in range(batch)]
    for kind, n in [("chain", 16), ("star", 16), ("deep", 64), ("random", 24)]:
        trees = [random_tree(kind, n, rng) for _ in range(batch)]
        tokens = [[rng.randrange(3, VOCAB) for _ in range(n)] for _ in range(batch)]
        ids, mask = left_pad(prefixes)
        v.prefill(ids, mask)
        logits, hidden = v.verify(torch.tensor(tokens), trees)
        assert logits.shape == (batch, n, VOCAB)
        assert hidden.shape == (batch, n, len(v.tap_layers) * v.hidden_size)
        for row in range(batch):
            expected = path_logits(model, prefixes[row], tokens[row], trees[row])
            torch.testing.assert_close(logits[row], expected, **TOL, msg=lambda m: f"{kind} row {row}: {m}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_commit_then_next_step_matches_eager(family):
    rng = random.Random(7)
    v = verifier(family, 2)
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (12, 5)]
    ids, mask = left_pad(prefixes)
    v.prefill(ids, mask)
    history = [list(p) for p in prefixes]
    for _ in range(3):  # several steps: holes from unequal accepted lengths must stay invisible
        trees = [random_tree("deep", 20, rng) for _ in range(2)]
        tokens = [[rng.randrange(3, VOCAB) for _ in range(20)] for _ in range(2)]
        v.verify(torch.tensor(tokens), trees)
        paths = [path_to(trees[r], rng.randrange(20)) for r in range(2)]
        v.commit(paths)
        for r in range(2):
            history[r] += [tokens[r][i] for i in paths[r]]
    nxt = [[rng.randrange(3, VOCAB) for _ in range(4)] for _ in range(2)]
    logits, _ = v.verify(torch.tensor(nxt), TreeSpec.chain(4))
    for r in range(2):
        expected = sequence_logits(v.model, history[r] + nxt[r])[-4:]
        torch.testing.assert_close(logits[r], expected, **TOL)


@pytest.mark.parametrize("model_prefill", [True, False])
def test_prefill_matches_eager_and_taps_match_hidden_states(model_prefill):
    model = make_model("llama")
    v = TreeVerifier(model, max_cache_len=128, budget=8, tap_layers=(0, 1), model_prefill=model_prefill)
    assert v._model_prefill is model_prefill  # decided by the construction's self-check
    ids = torch.randint(3, VOCAB, (1, 19))
    logits, hidden = v.prefill(ids)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(logits, out.logits[:, -1], **TOL)
    expected = torch.cat([out.hidden_states[1], out.hidden_states[2]], dim=-1)
    torch.testing.assert_close(hidden, expected, **TOL)


SLIDING = {"qwen2", "mistral", "gemma3", "phi3", "gemma2"}  # a sliding-window cache layer keeps fewer than P tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_prefill_fills_the_state_the_graph_would(family):
    """With no tap on the last layer, one forward of the model itself prefills where its cache is one full
    tensor per layer (else the graph does); cache, taps, logits and the next verify equal the graph's chunked
    prefill, left padding included."""
    model = make_model(family)
    kw = dict(max_cache_len=128, batch_size=2, budget=8, tap_layers=(0, 1), prefill_chunk=8, self_check=False)
    fast, graph = TreeVerifier(model, **kw), TreeVerifier(model, model_prefill=False, **kw)
    rng = random.Random(3)
    ids, mask = left_pad([[rng.randrange(3, VOCAB) for _ in range(n)] for n in (21, 13)])
    (logits, hidden), (expected_logits, expected_hidden) = fast.prefill(ids, mask), graph.prefill(ids, mask)
    assert fast._model_prefill is (family not in SLIDING)
    real = mask.bool()
    torch.testing.assert_close(logits, expected_logits, **TOL)
    torch.testing.assert_close(hidden[real], expected_hidden[real], **TOL)
    assert torch.equal(fast.cache.valid, graph.cache.valid) and fast.cache.length == graph.cache.length
    slots = fast.cache.valid[None, :, None, :, None].expand_as(fast.cache.kv)
    torch.testing.assert_close(fast.cache.kv[slots], graph.cache.kv[slots], **TOL)
    tree, tokens = random_tree("random", 8, rng), torch.randint(3, VOCAB, (2, 8))
    torch.testing.assert_close(fast.verify(tokens, tree)[0], graph.verify(tokens, tree)[0], **TOL)


def test_a_left_padded_batch_is_prefilled_row_by_row_over_its_real_tokens():
    """No prefill compute on padding: each row of a left-padded batch runs alone over its own tokens (the state
    equals the graph's, test above); a mask that is not left padding runs as one batched forward."""
    model = make_model("llama")
    v = TreeVerifier(model, max_cache_len=128, batch_size=2, budget=8, tap_layers=(0, 1), self_check=False)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        ids, mask = left_pad([[5] * 21, [6] * 13])
        v.prefill(ids, mask)  # the first prefill also checks the model path against the graph's
        assert v._model_prefill
        v.cache.kv.fill_(float("nan"))  # whatever an earlier prompt left in the padding slots
        seen.clear()
        v.prefill(ids, mask)
        assert [tuple(s) for s in seen] == [(1, 21), (1, 13)]
        assert bool(torch.isfinite(v.cache.kv[:, :, :, :21]).all())  # padding slots zeroed: masked, but finite
        seen.clear()
        v.prefill(ids, mask.flip(1))  # right padding
        assert [tuple(s) for s in seen] == [(2, 21)]
    finally:
        hook.remove()


def test_model_prefill_that_disagrees_with_the_graph_is_not_used(monkeypatch):
    model = make_model("llama")
    original = prefill_paths.prefill_with_model

    def off_by_a_bit(verifier, *args):
        out = original(verifier, *args)
        verifier.cache.kv.add_(1e-2)
        return out

    monkeypatch.setattr(prefill_paths, "prefill_with_model", off_by_a_bit)
    v = TreeVerifier(model, max_cache_len=128, budget=8, tap_layers=(0, 1))  # the self-check prefills once
    assert v._model_prefill is False
    ids = torch.randint(3, VOCAB, (1, 19))
    logits, _ = v.prefill(ids)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids=ids).logits[:, -1], **TOL)


def test_bad_inputs_get_clear_errors():
    v = TreeVerifier(make_model("llama"), max_cache_len=40, budget=8)
    with pytest.raises(ValueError, match="empty"):
        v.prefill(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        v.prefill(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit"):
        v.prefill(torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(RuntimeError, match="prefill"):
        v.verify(torch.ones(1, 2, dtype=torch.long), TreeSpec.chain(2))
    v.prefill(torch.ones(1, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="budget"):
        v.verify(torch.ones(1, 9, dtype=torch.long), TreeSpec.chain(9))
    with pytest.raises(ValueError, match="nodes but"):
        v.verify(torch.ones(1, 3, dtype=torch.long), TreeSpec.chain(2))
    with pytest.raises(ValueError, match="token ids"):
        v.verify(torch.full((1, 2), VOCAB, dtype=torch.long), TreeSpec.chain(2))
    v.verify(torch.ones(1, 3, dtype=torch.long), TreeSpec((-1, 0, 0)))
    with pytest.raises(ValueError, match="not a root-to-node path"):
        v.commit([[0, 1, 2]])
    v.commit([[0, 2]])
    v.verify(torch.ones(1, 3, dtype=torch.long), TreeSpec.chain(3))
    v.commit([[0, 1, 2]])  # 20 + 2 + 3 = 25 slots
    with pytest.raises(CacheFullError, match="max_cache_len"):
        for _ in range(10):
            v.verify(torch.ones(1, 8, dtype=torch.long), TreeSpec.chain(8))
            v.commit([list(range(8))])


def test_non_causal_model_is_refused():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        TreeVerifier(bert, max_cache_len=32, budget=4)


def test_prepare_lowers_every_graph_up_front():
    lowered = []

    def spy(step):
        lowered.append(step.budget)
        return step.graph_module

    v = TreeVerifier(make_model("llama"), max_cache_len=128, budget=8, extra_budgets=(1, 4), compile_fn=spy,
                     self_check=False, prefill_chunk=32)
    assert lowered == [8]
    assert v.prepare() == [1, 4, 8, 32]
    assert sorted(lowered) == [1, 4, 8, 32] and sorted(v._graphs) == [1, 4, 8, 32]
    # where the model itself prefills, no prefill-chunk graph is lowered
    v = TreeVerifier(make_model("llama"), max_cache_len=128, budget=8, tap_layers=(0, 1), compile_fn=spy,
                     self_check=False, prefill_chunk=32)
    assert v.prepare() == [8]
