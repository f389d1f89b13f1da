"""ONNX export and the onnxruntime backend: equal to PyTorch, lossless, TensorRT-compatible ops, atomic files."""

import functools
import random

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.backends import onnx as onnx_backend
from jetspec_compile.backends.onnx import TENSORRT_ONNX_OPS, export_onnx, lower_onnxruntime, onnx_op_types
from jetspec_compile.backends.onnx_drafter import OrtDraftStep, export_drafter_onnx
from jetspec_compile.drafter import DrafterConfig, JetSpecDrafter, ParallelDrafter
from jetspec_compile.drafter.step import DraftStep
from jetspec_compile.drafter.step import draft_inputs as _draft_inputs
from tests.families import VOCAB, make_model
from tests.reference import random_tree


@functools.lru_cache(maxsize=None)
def pair(family):
    model = make_model(family)
    eager = js.TreeVerifier(model, max_cache_len=160, budget=16)
    ort = js.TreeVerifier(model, max_cache_len=160, budget=16, compile_fn=lower_onnxruntime)
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
    path = export_onnx(make_model("gemma3"), tmp_path / "v.onnx", budget=8)
    ops = onnx_op_types(path)
    assert ops and ops <= TENSORRT_ONNX_OPS, sorted(ops - TENSORRT_ONNX_OPS)
    assert (tmp_path / "v.onnx.json").exists()


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_backend.torch.onnx, "export", boom)
    with pytest.raises(js.JetSpecError, match="nothing was written.*exporter crashed"):
        export_onnx(make_model("llama"), tmp_path / "v.onnx", budget=4)
    assert list(tmp_path.iterdir()) == []



# -- the drafter step ------------------------------------------------------------------------------------------

def tiny_jetspec(family="llama", layers=2, block=4):
    target = make_model(family)
    cfg = DrafterConfig.for_target(target.config, (0, 2), num_layers=layers, block_size=block)
    return target, ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings()).eval()


def test_onnxruntime_drafter_step_equals_pytorch_at_every_context_length(tmp_path):
    _, net = tiny_jetspec()
    path = export_drafter_onnx(net, tmp_path / "draft.onnx")  # one file for all the lengths below
    ops = onnx_op_types(path)
    assert ops and ops <= TENSORRT_ONNX_OPS, sorted(ops - TENSORRT_ONNX_OPS)
    step, ort_step = DraftStep(net), OrtDraftStep(path)
    for seed, (context, new, blocks) in enumerate([(0, 9, 1), (13, 2, 1), (50, 0, 1), (31, 4, 3)]):
        inputs = _draft_inputs(net, context, new, blocks, seed)
        with torch.no_grad():
            expected, expected_kv = step(**inputs)
        actual, actual_kv = ort_step(**inputs)
        assert actual.shape == (blocks, net.cfg.block_size, VOCAB)
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(actual.topk(4).indices, expected.topk(4).indices)
        for (ak, av), (ek, ev) in zip(actual_kv, expected_kv):
            assert ak.shape == ek.shape == (1, net.cfg.num_kv_heads, new, net.cfg.head_dim)
            torch.testing.assert_close(ak, ek, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(av, ev, atol=1e-5, rtol=1e-5)


def test_drafter_with_a_draft_vocabulary_exports_only_its_head_rows(tmp_path):
    _, net = tiny_jetspec()
    small = net.restrict_vocab(list(range(3, VOCAB, 3)))
    path = export_drafter_onnx(small, tmp_path / "draft.onnx")  # checked against PyTorch inside
    inputs = _draft_inputs(small, 7, 2, 2, seed=3)
    with torch.no_grad():
        expected, _ = DraftStep(small)(**inputs)
    actual, _ = OrtDraftStep(path)(**inputs)
    assert actual.shape == (2, net.cfg.block_size, small.cfg.draft_vocab_size)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_onnxruntime_runs_verify_and_drafter_steps_and_stays_lossless():
    target, net = tiny_jetspec()
    spec = js.attach_drafter(target, JetSpecDrafter(net, width=3), backend="onnxruntime", budget=8,
                             max_cache_len=128)
    ids = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(4))
    expected = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    assert torch.equal(spec.generate(ids, max_new_tokens=40), expected)
    assert isinstance(spec.runtime_drafter().step_fn, OrtDraftStep)
    assert spec.drafter.step_fn is spec.drafter.step  # the drafter passed in is left as it was
    assert isinstance(spec.verifier(1).graph, onnx_backend.OrtVerifyStep)
    assert spec.last_stats["drafter_calls"] > 0


def test_drafter_export_refuses_what_onnxruntime_cannot_run(tmp_path):
    _, net = tiny_jetspec(layers=1)
    with pytest.raises(js.JetSpecError, match="float32 only"):
        export_drafter_onnx(net.to(torch.bfloat16), tmp_path / "d.onnx")
    with pytest.raises(js.JetSpecError, match="NGramDrafter"):
        export_drafter_onnx(js.NGramDrafter(), tmp_path / "d.onnx")
    assert list(tmp_path.iterdir()) == []


def test_misnamed_drafter_inputs_are_caught_before_the_file_is_written(tmp_path, monkeypatch):
    """The first drafter export's failure: names listed by hand, grouped by kind (``past_k_0, past_k_1, past_v_0,
    ...``), while the exporter flattens ``past`` layer by layer. Same shapes, so no error, only wrong numbers."""
    _, net = tiny_jetspec()
    export = torch.onnx.export

    def misnamed(*args, input_names, **kwargs):
        past = sorted((n for n in input_names if n.startswith("past_")), key=lambda n: (n[5], int(n[7:])))
        return export(*args, input_names=[n for n in input_names if not n.startswith("past_")] + past, **kwargs)

    monkeypatch.setattr(onnx_backend.torch.onnx, "export", misnamed)
    with pytest.raises(js.JetSpecError, match="nothing was written.*disagrees with PyTorch"):
        export_drafter_onnx(net, tmp_path / "d.onnx")
    assert list(tmp_path.iterdir()) == []
