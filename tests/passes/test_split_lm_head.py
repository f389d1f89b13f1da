"""split_lm_head: the graph ends at the head's input, the runtime's head gives the same logits and argmax, and
decoding through it stays token-identical to HF generate (eager and Inductor)."""

import functools

import pytest
import torch

import jetspec_compile as js
from jetspec_compile import TreeVerifier
from jetspec_compile.backends import lower_eager
from jetspec_compile.compiler import build_verify_step
from jetspec_compile.drafter import NGramDrafter
from jetspec_compile.kernels import cpu_linear
from jetspec_compile.passes import split_lm_head
from jetspec_compile.tree import TreeSpec
from tests.families import VOCAB, make_model
from tests.reference import random_tree

pytestmark = pytest.mark.skipif(not cpu_linear.bf16_supported(),
                                reason="this PyTorch build has no oneDNN bf16 GEMM")

certified = functools.partial(lower_eager, lm_head="certified")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3"])
def test_split_graph_gives_the_same_logits_and_argmax(family):
    import random

    model = make_model(family)
    split = TreeVerifier(model, max_cache_len=96, budget=8, compile_fn=certified)
    whole = TreeVerifier(model, max_cache_len=96, budget=8, compile_fn=lower_eager)
    assert split.head is not None and whole.head is None
    assert split.interface.output_names[0] == "head_input" and whole.interface.output_names[0] == "logits"
    assert tuple(split.graph.graph.find_nodes(op="output")[0].args[0][0].meta["val"].shape) == (
        1, 8, model.config.hidden_size)
    rng = random.Random(0)
    ids = torch.randint(0, VOCAB, (1, 21), generator=torch.Generator().manual_seed(0))
    for v in (split, whole):
        v.prefill(ids)
    for kind in ("deep", "star"):
        tree = random_tree(kind, 8, rng)
        tokens = torch.tensor([[rng.randrange(VOCAB) for _ in range(8)]])
        logits, hidden = split.verify(tokens, tree)
        expected, expected_hidden = whole.verify(tokens, tree)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden, expected_hidden)
        target, _ = split.verify_greedy(tokens, tree)
        assert torch.equal(target, expected.argmax(-1))
        for v in (split, whole):
            v.commit([[]])


def test_heads_it_cannot_split_stay_in_the_graph():
    gemma2 = make_model("gemma2")  # logit soft-capping after the head
    step, _ = build_verify_step(gemma2, budget=4)
    result = split_lm_head(step, "certified")
    assert not result.modified and "plain linear" in result.stats["skipped"] and step.lm_head is None
    step, _ = build_verify_step(make_model("llama"), budget=4)
    assert not split_lm_head(step, "exact").modified  # kept on request
    assert not split_lm_head(step, "auto").modified  # a 97-token head is too small to be worth it
    assert split_lm_head(step, "certified").modified and step.interface.split_head


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_generate_through_the_certified_head_is_lossless(family):
    model = make_model(family)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    spec = js.optimize(model, budget=8, max_cache_len=128, drafter=NGramDrafter(), lm_head="certified")
    assert spec.verifier(2).head is not None
    assert torch.equal(spec.generate(ids, max_new_tokens=40), expected)
    # sampling reads the exact logits from the same head: the same draws as with the head in the graph
    outs = []
    for setting in ("certified", "exact"):
        spec = js.optimize(model, budget=8, max_cache_len=128, drafter=NGramDrafter(), lm_head=setting)
        outs.append(spec.generate(ids[:1], max_new_tokens=20, do_sample=True, temperature=0.8,
                                  generator=torch.Generator().manual_seed(3)))
    assert torch.equal(*outs)


def test_inductor_through_the_certified_head_is_lossless():
    model = make_model("llama")
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False)
    spec = js.optimize(model, backend="inductor", budget=8, max_cache_len=128, drafter=NGramDrafter(),
                       lm_head="certified")
    assert torch.equal(spec.generate(ids, max_new_tokens=60), expected)
    assert spec.verifier(1).head is not None


def test_chain_prefill_through_the_graph_applies_the_head():
    model = make_model("llama")
    v = TreeVerifier(model, max_cache_len=96, budget=4, compile_fn=certified, model_prefill=False)
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(4))
    logits, _ = v.prefill(ids)  # three chains of four tokens through the graph
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    target, _ = v.verify_greedy(torch.tensor([[int(expected.argmax())]]), TreeSpec.chain(1))
    assert target.shape == (1, 1)


def test_the_setting_is_checked_where_it_is_given(monkeypatch):
    with pytest.raises(ValueError, match="lm_head must be one of"):
        js.JetSpecConfig(lm_head="bf16")
    monkeypatch.setenv("JETSPEC_LM_HEAD", "fp16")
    with pytest.raises(ValueError, match="JETSPEC_LM_HEAD"):
        js.optimize(make_model("llama"), budget=4, max_cache_len=64).verifier(1)
