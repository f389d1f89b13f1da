"""ONNX export and the onnxruntime backend: equal to PyTorch, lossless, TensorRT-compatible ops, atomic files."""

import functools
import random

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.backends import onnx as onnx_backend
from jetspec_compile.backends.onnx import TENSORRT_ONNX_OPS, export_onnx, lower_onnxruntime, onnx_op_types
from tests.families import VOCAB, make_model
from tests.reference import random_tree


@functools.lru_cache(maxsize=None)
def pair(family):
    model = make_model(family)
    eager = js.TreeVerifier(model, max_cache_len=160, num_nodes=16)
    ort = js.TreeVerifier(model, max_cache_len=160, num_nodes=16, compile_fn=lower_onnxruntime)
    return model, eager, ort


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "mistral"])
def test_onnxruntime_logits_and_hidden_equal_pytorch(family):
    model, eager, ort = pair(family)
    rng = random.Random(0)
    prompt = torch.tensor([[rng.randrange(3, VOCAB) for _ in range(21)]])
    for v in (eager, ort):
        v.prefill(prompt)
    for kind in ("deep", "star", "random"):
        tree = random_tree(kind, 16, rng)
        tokens = torch.tensor([[rng.randrange(3, VOCAB) for _ in range(16)]])
        (le, he), (lo, ho) = eager.verify(tokens, tree), ort.verify(tokens, tree)
        torch.testing.assert_close(lo, le, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ho, he, atol=1e-4, rtol=1e-4)
        path = [0] + [i for i in range(1, 16) if tree.parents[i] == 0][:1]
        eager.commit([path])
        ort.commit([path])


def test_onnxruntime_greedy_generation_is_lossless():
    model = make_model("qwen3")
    spec = js.optimize(model, backend="onnxruntime", budget=8, max_cache_len=96)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    assert torch.equal(spec.generate(ids, max_new_tokens=30), expected)


def test_export_uses_only_tensorrt_supported_ops(tmp_path):
    path = export_onnx(make_model("gemma3"), tmp_path / "v.onnx", num_nodes=8)
    ops = onnx_op_types(path)
    assert ops and ops <= TENSORRT_ONNX_OPS, sorted(ops - TENSORRT_ONNX_OPS)
    assert (tmp_path / "v.onnx.json").exists()


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_backend.torch.onnx, "export", boom)
    with pytest.raises(js.JetSpecError, match="nothing was written.*exporter crashed"):
        export_onnx(make_model("llama"), tmp_path / "v.onnx", num_nodes=4)
    assert list(tmp_path.iterdir()) == []

