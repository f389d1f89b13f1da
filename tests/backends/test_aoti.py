"""AOTInductor packages: lossless, saved once and reloaded without compiling, never reused for another model."""

import re
import zipfile

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.backends import aoti, inductor
from jetspec_compile.counters import counters
from jetspec_compile.drafter import DrafterConfig, JetSpecDrafter, ParallelDrafter
from tests.families import VOCAB, make_model


def packaged_linears(package) -> int:
    """oneDNN linear calls in an AOTInductor package's generated C++ wrapper."""
    with zipfile.ZipFile(package) as z:
        source = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
    return len(re.findall(r"aoti_torch_cpu__linear_pointwise\w*\(", source))


def test_aoti_packages_are_lossless_and_reload_without_compiling(tmp_path, monkeypatch):
    """The verify graph and the drafter step both run from .pt2 packages; a second start compiles nothing."""
    model = make_model("llama")
    cfg = DrafterConfig.for_target(model.config, (0, 1), num_layers=1, block_size=4)
    drafter = JetSpecDrafter(ParallelDrafter(cfg, model.get_input_embeddings(), model.get_output_embeddings()),
                             path_branches=2)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    options = dict(backend="aoti", artifact_dir=str(tmp_path), budget=12, max_cache_len=128, fallback=False,
                   self_check=False, drafter=drafter)  # one verify graph: the prompt fits one verify call
    counters["aoti"].clear()
    spec = js.optimize(model, **options)
    assert torch.equal(spec.generate(ids, max_new_tokens=40), expected)
    assert isinstance(spec.runtime_drafter().step_fn, aoti.AotiDraftStep)
    assert counters["aoti"] == {"compiled": 2, "loaded": 2}
    packages = sorted(p.name for p in tmp_path.iterdir())
    assert [p.split("_")[0] for p in packages] == ["draft", "draft", "verify", "verify"]
    # frozen weights packed for oneDNN, q/k/v and gate/up as one GEMM each (CONCAT_LINEARS): 4 per layer + head
    verify = next(tmp_path.glob("verify_*.pt2"))
    per_layer = 4 if inductor.CONCAT_LINEARS else 7
    assert packaged_linears(verify) == per_layer * model.config.num_hidden_layers + 1

    def no_compiling(*args, **kwargs):
        raise AssertionError("a saved package was compiled again")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiling)
    assert torch.equal(js.optimize(model, **options).generate(ids, max_new_tokens=40), expected)
    assert counters["aoti"] == {"compiled": 2, "loaded": 4}
    # a model with other weights must not pick up this package: its fingerprint differs, so it would compile
    other = make_model("llama", seed=1)
    assert aoti.model_fingerprint(other) != aoti.model_fingerprint(model)
    with pytest.raises(js.JetSpecError, match="nothing was written"):
        js.optimize(other, **{**options, "drafter": None}).generate(ids, max_new_tokens=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == packages  # the failed compile left no file


def test_incomplete_package_is_refused(tmp_path):
    (tmp_path / "verify.pt2").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="not a complete AOTInductor package"):
        aoti.AotiVerifyStep(tmp_path / "verify.pt2")
