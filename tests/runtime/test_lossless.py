import torch

import jetspec_compile as js
from jetspec_compile.runtime import loop
from tests.families import VOCAB, make_model


def test_check_lossless_passes_for_the_real_runtime():
    spec = js.optimize(make_model("qwen2"), budget=8, max_cache_len=96)
    prompts = [[5, 6, 7, 8, 9], torch.tensor([11, 12, 13])]
    report = js.check_lossless(spec, prompts, max_new_tokens=20)
    assert report.ok and "lossless" in str(report)


def test_check_lossless_reports_first_divergence(monkeypatch):
    spec = js.optimize(make_model("llama"), budget=8, max_cache_len=96)
    real_accept = loop.accept

    def off_by_one(logits, trees, params):  # a broken acceptance rule: bonus token shifted
        return [(path, (bonus + 1) % VOCAB) for path, bonus in real_accept(logits, trees, params)]

    monkeypatch.setattr(loop, "accept", off_by_one)
    report = js.check_lossless(spec, [[5, 6, 7, 8, 9]], max_new_tokens=10)
    assert not report.ok
    (m,) = report.mismatches
    assert m["position"] == 1 and m["margin"] > 0  # token 0 comes from prefill, token 1 from the first step
    assert "first difference at new token 1" in str(report)
