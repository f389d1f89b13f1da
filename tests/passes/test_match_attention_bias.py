import pytest
import torch

from jetspec_compile import TreeVerifier, UnsupportedModelError
from jetspec_compile.compiler import build_verify_step
from tests.families import make_model


def test_alibi_slopes_are_found_and_plain_masks_have_none():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    model = make_model("bloom")
    step, results = build_verify_step(model, budget=6, run_checks=True)
    heads = model.config.n_head
    expected = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]  # slope · key position 1
    assert sorted(step.alibi_slopes) == list(range(step.num_layers))
    for slopes in step.alibi_slopes.values():
        torch.testing.assert_close(slopes, expected)
    assert results["insert_tree_alibi"].stats["alibi_layers"] == step.num_layers
    assert build_verify_step(make_model("llama"), budget=6)[0].alibi_slopes == {}


def test_one_token_graphs_judge_the_bias_from_a_longer_capture():
    step, _ = build_verify_step(make_model("bloom"), budget=1)
    assert sorted(step.alibi_slopes) == list(range(step.num_layers))


def _patch_sdpa(monkeypatch, extra):
    """Make the model's SDPA attention add ``extra(mask [.., N, L]) -> mask``: an attention variant the passes
    do not model."""
    from transformers.integrations import sdpa_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = sdpa_attention.sdpa_attention_forward

    def variant(module, query, key, value, attention_mask, **kwargs):
        n, length = query.shape[-2], key.shape[-2]
        if attention_mask is None:
            attention_mask = torch.ones(n, length, dtype=torch.bool).tril()
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
        return original(module, query, key, value, extra(attention_mask), **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", variant)


@pytest.mark.parametrize("extra, message", [
    # a position bias quadratic in the distance (not ALiBi)
    (lambda m: m - 0.05 * (torch.arange(m.shape[-2])[:, None] - torch.arange(m.shape[-1])[None]).float() ** 2,
     "neither zero nor linear"),
    # a mask that also hides the key just before each query (causal, but not the causal mask)
    (lambda m: m.masked_fill(torch.arange(m.shape[-2])[:, None] - torch.arange(m.shape[-1])[None] == 1,
                             torch.finfo(m.dtype).min), "not causal"),
])
def test_unmodelled_attention_variant_is_refused(monkeypatch, extra, message):
    model = make_model("llama")
    _patch_sdpa(monkeypatch, extra)
    with pytest.raises(UnsupportedModelError, match=message):
        TreeVerifier(model, max_cache_len=64, budget=6)
