"""AOTInductor packages: lossless, saved once and reloaded without compiling, never reused for another model."""

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.backends import aoti
from jetspec_compile.drafter import NGramDrafter
from tests.families import VOCAB, make_model


def test_aoti_package_is_lossless_and_reloads_without_compiling(tmp_path, monkeypatch):
    model = make_model("llama")
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    options = dict(backend="aoti", artifact_dir=str(tmp_path), budget=12, max_cache_len=128, fallback=False,
                   self_check=False, drafter=NGramDrafter())  # one graph: the prompt fits one verify call
    aoti.STATS.update(compiled=0, loaded=0)
    assert torch.equal(js.optimize(model, **options).generate(ids, max_new_tokens=40), expected)
    assert aoti.STATS == {"compiled": 1, "loaded": 1}
    packages = sorted(p.name for p in tmp_path.iterdir())
    assert len(packages) == 2 and packages[0].endswith(".pt2") and packages[1].endswith(".pt2.json")

    def no_compiling(*args, **kwargs):
        raise AssertionError("a saved package was compiled again")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiling)
    assert torch.equal(js.optimize(model, **options).generate(ids, max_new_tokens=40), expected)
    assert aoti.STATS == {"compiled": 1, "loaded": 2}
    # a model with other weights must not pick up this package: its fingerprint differs, so it would compile
    other = make_model("llama", seed=1)
    assert aoti.model_fingerprint(other) != aoti.model_fingerprint(model)
    with pytest.raises(js.JetSpecError, match="nothing was written"):
        js.optimize(other, **options).generate(ids, max_new_tokens=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == packages  # the failed compile left no file


def test_incomplete_package_is_refused(tmp_path):
    (tmp_path / "verify.pt2").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="not a complete AOTInductor package"):
        aoti.AotiVerifyStep(tmp_path / "verify.pt2")
