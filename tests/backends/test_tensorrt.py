"""TensorRT engines: built and run only where `tensorrt` imports and a GPU is present; skipped (with the reason
printed) elsewhere. What runs everywhere: the ONNX file is written and the missing piece is named."""

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.backends.tensorrt import export_tensorrt, tensorrt_available
from tests.families import VOCAB, make_model

AVAILABLE, WHY = tensorrt_available()


@pytest.mark.skipif(AVAILABLE, reason="TensorRT is available: the engine tests below run instead")
def test_without_tensorrt_export_writes_onnx_and_names_what_is_missing(tmp_path):
    with pytest.raises(js.JetSpecError, match="cannot build the engine"):
        export_tensorrt(make_model("llama"), tmp_path, budget=4)
    assert (tmp_path / "verify.onnx").exists() and not (tmp_path / "verify.engine").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not AVAILABLE, reason=f"TensorRT engine build not possible here: {WHY}")
def test_tensorrt_generation_is_lossless(tmp_path):
    model = make_model("llama").cuda()
    spec = js.optimize(model, backend="tensorrt", budget=8, max_cache_len=128)
    ids = torch.randint(3, VOCAB, (1, 9), device="cuda")
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert torch.equal(spec.generate(ids, max_new_tokens=20), expected)
    paths = export_tensorrt(spec, tmp_path, budget=8)
    assert paths["engine"].stat().st_size > 0
