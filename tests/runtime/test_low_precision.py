"""The low-precision promise of ``check_lossless`` (docs/precision.md): in bf16, speculative greedy output equals
``model.generate`` except at near ties of the target's own logits, and a real error is still caught."""

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.runtime import loop
from jetspec_compile.runtime.lossless import near_tie_tolerance
from tests.families import VOCAB, make_model

PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 14, 11, 12], [40, 41, 3, 40, 41]]


def test_near_tie_tolerance_scales_with_dtype_and_logit():
    assert near_tie_tolerance(torch.bfloat16, 20.0) == pytest.approx(8 * 2 ** -7 * 20)
    assert near_tie_tolerance(torch.float16, 20.0) == pytest.approx(8 * 2 ** -10 * 20)
    assert near_tie_tolerance(torch.float32, 0.1) == pytest.approx(8 * 2 ** -23)  # at least one unit of 1.0
    assert near_tie_tolerance(torch.bfloat16, -20.0, ulps=1) == pytest.approx(2 ** -7 * 20)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bf16_output_keeps_the_promise(family):
    spec = js.optimize(make_model(family).to(torch.bfloat16), budget=8, max_cache_len=96)
    report = js.check_lossless(spec, PROMPTS, max_new_tokens=24)
    assert report.dtype == "bfloat16"
    assert report.within_tolerance, str(report)
    for m in report.mismatches:  # a difference is only ever a near tie
        assert m["near_tie"] and abs(m["gap"]) <= m["tolerance"]


def test_bf16_check_still_catches_a_wrong_token(monkeypatch):
    spec = js.optimize(make_model("llama").to(torch.bfloat16), budget=8, max_cache_len=96)
    real_accept = loop.accept

    def off_by_one(logits, trees, params):  # a broken acceptance rule: bonus token shifted
        return [(path, (bonus + 1) % VOCAB) for path, bonus in real_accept(logits, trees, params)]

    monkeypatch.setattr(loop, "accept", off_by_one)
    report = js.check_lossless(spec, PROMPTS[:1], max_new_tokens=10)
    assert not report.ok and not report.within_tolerance
    (m,) = report.mismatches
    assert m["position"] == 1 and m["gap"] > m["tolerance"] and not m["near_tie"]
    assert "beyond the tolerance" in str(report)
    # the classification is the tolerance, nothing else: with an absurd one the same output counts as near ties
    assert js.check_lossless(spec, PROMPTS[:1], max_new_tokens=10, ulps=1e9).within_tolerance


@pytest.mark.slow
def test_smollm2_bf16_keeps_the_promise():
    from jetspec_compile.drafter import load_jetspec_drafter
    from jetspec_compile.models import load_smollm2
    from jetspec_compile.prompts import encode_chat, load_prompts

    model, tok = load_smollm2(dtype="bfloat16")
    spec = js.optimize(model, drafter=load_jetspec_drafter("smollm2", model), budget=16, max_cache_len=512)
    prompts = [encode_chat(tok, p) for p in load_prompts("gsm", "test", 2)]
    report = js.check_lossless(spec, prompts, max_new_tokens=40)
    assert report.within_tolerance, str(report)
