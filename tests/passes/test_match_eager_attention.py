import pytest
import torch

from jetspec_compile import UnsupportedModelError, capture_step
from jetspec_compile.passes import PassManager, match_eager_attention
from jetspec_compile.passes.patterns import find_attention_nodes, softcapped_attention
from tests.families import VOCAB, make_model


@pytest.mark.parametrize("family, op", [("gemma2", softcapped_attention),
                                        ("bloom", torch.ops.aten.scaled_dot_product_attention.default)])
def test_eager_attention_becomes_one_op_per_layer_and_keeps_the_logits(family, op):
    model = make_model(family)
    step = capture_step(model, budget=6)
    assert not find_attention_nodes(step.graph_module)  # eager: matmul-softmax-matmul, no attention op yet
    results = PassManager([match_eager_attention], run_checks_after_each_pass=True)(step)
    attention = find_attention_nodes(step.graph_module)
    assert results["match_eager_attention"].stats["eager_attention_matched"] == step.num_layers == len(attention)
    assert all(node.target is op for node in attention)
    if family == "gemma2":
        assert all(node.kwargs["softcap"] == model.config.attn_logit_softcapping for node in attention)
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        (actual,) = step.graph_module(ids, torch.arange(6)[None])
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_softcapped_attention_matches_its_definition():
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.zeros(2, 1, 3, 5).masked_fill(torch.rand(2, 1, 3, 5) < 0.3, float("-inf"))
    mask[..., 0] = 0
    out = softcapped_attention(q, k, v, attn_mask=mask, scale=0.5, softcap=2.0, enable_gqa=True)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = torch.tanh(q @ kk.transpose(-1, -2) * 0.5 / 2.0) * 2.0 + mask
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ vv)


def test_scores_scaled_after_the_mask_are_refused(monkeypatch):
    """An eager attention whose order of operations the pass does not model raises instead of matching."""
    from transformers.models.gemma2 import modeling_gemma2

    def reordered(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
        key = modeling_gemma2.repeat_kv(key, module.num_key_value_groups)
        value = modeling_gemma2.repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(query, key.transpose(2, 3)) + attention_mask
        scores = torch.softmax(scores * scaling, dim=-1)
        return torch.matmul(scores, value).transpose(1, 2).contiguous(), scores

    monkeypatch.setattr(modeling_gemma2, "eager_attention_forward", reordered)
    step = capture_step(make_model("gemma2"), budget=4)
    with pytest.raises(UnsupportedModelError, match="scaled after"):
        match_eager_attention(step)


def test_masked_fill_masks_and_alibi_added_to_4d_scores_are_matched():
    """MPT's eager attention: an ALiBi term broadcast onto 4-D scores, then masked_fill with the dtype minimum."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from jetspec_compile.compiler import build_verify_step

    config = AutoConfig.for_model("mpt", d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=64)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    step = capture_step(model, batch_size=2, budget=5)
    PassManager([match_eager_attention], run_checks_after_each_pass=True)(step)
    assert len(find_attention_nodes(step.graph_module)) == step.num_layers
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        (actual,) = step.graph_module(ids, torch.arange(5).expand(2, 5))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    step, _ = build_verify_step(model, batch_size=2, budget=5)
    assert sorted(step.alibi_slopes) == [0, 1]
