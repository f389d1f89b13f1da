"""What a parallel drafter computes in on CPU (``drafter_dtype``): the settings, the bf16 copy of the network, and
the loop's output, identical to HF's whatever the drafter's precision."""

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.drafter import DrafterConfig, JetSpecDrafter, NGramDrafter, ParallelDrafter, precision
from jetspec_compile.drafter.step import draft_inputs
from jetspec_compile.kernels import cpu_linear
from tests.families import VOCAB, make_model

needs_bf16 = pytest.mark.skipif(not cpu_linear.bf16_supported(), reason="this PyTorch build has no oneDNN bf16 GEMM")


def build(family="llama", block_size=4):
    target = make_model(family)
    target.generation_config.eos_token_id = None
    cfg = DrafterConfig.for_target(target.config, (0, 1), num_layers=1, block_size=block_size)
    return target, JetSpecDrafter(ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings()))


def test_settings_and_clear_errors(monkeypatch):
    monkeypatch.delenv("JETSPEC_DRAFTER_DTYPE", raising=False)
    assert precision.drafter_dtype_setting(None) == "auto"
    monkeypatch.setenv("JETSPEC_DRAFTER_DTYPE", "float32")
    assert precision.drafter_dtype_setting(None) == "float32"
    assert precision.resolve_drafter_dtype(None) == torch.float32
    assert precision.drafter_dtype_setting("bfloat16") == "bfloat16"  # an argument wins over the variable
    monkeypatch.setenv("JETSPEC_DRAFTER_DTYPE", "fp16")
    with pytest.raises(ValueError, match="JETSPEC_DRAFTER_DTYPE"):
        precision.drafter_dtype_setting(None)
    with pytest.raises(ValueError, match="drafter_dtype must be one of"):
        js.JetSpecConfig(drafter_dtype="half")


@pytest.mark.parametrize("kernel,instructions,expected",
                         [(True, True, torch.bfloat16), (True, False, torch.float32), (False, True, torch.float32)])
def test_auto_is_bf16_only_with_the_kernel_and_the_instructions(monkeypatch, kernel, instructions, expected):
    monkeypatch.setattr(precision, "bf16_supported", lambda: kernel)
    monkeypatch.setattr(precision, "native_bf16", lambda: instructions)
    assert precision.resolve_drafter_dtype("auto") == expected
    assert precision.resolve_drafter_dtype("float32") == torch.float32


def test_bf16_instructions_are_read_from_cpuinfo():
    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    skylake = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
    sapphire = "flags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"
    graviton3 = "Features\t: fp asimd sve bf16 i8mm\n"
    neoverse_n1 = "Features\t: fp asimd crc32 atomics\n"
    assert [cpu_linear.cpuinfo_has_bf16(t) for t in (zen4, skylake, sapphire, graviton3, neoverse_n1)] == [
        True, False, True, True, False]
    assert not cpu_linear.cpuinfo_has_bf16("model name\t: something with bf16 in its name\n")  # flags lines only


def test_bf16_without_the_kernel_is_refused(monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda: False)
    with pytest.raises(RuntimeError, match="drafter_dtype='float32'"):
        precision.resolve_drafter_dtype("bfloat16")


@needs_bf16
def test_the_bf16_copy_shares_the_target_and_leaves_the_original_alone():
    target, drafter = build()
    low = precision.in_drafter_dtype(drafter, "bfloat16")
    assert low is not drafter and drafter.model.fc.weight.dtype == torch.float32
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    assert low.model.embed is target.get_input_embeddings()  # the target's weights are read, not copied
    assert low.model.lm_head.weight.dtype == torch.float32
    assert precision.in_drafter_dtype(low, "float32") is low  # a network the caller cast is left as it is
    assert precision.in_drafter_dtype(drafter, "float32") is drafter
    ngram = NGramDrafter()
    assert precision.in_drafter_dtype(ngram, "bfloat16") is ngram


@needs_bf16
@pytest.mark.parametrize("vocab", [None, 40])
def test_the_bf16_step_gives_the_fp32_steps_distributions_up_to_rounding(vocab):
    """Packed bf16 linears (several rows) and plain ones (one new token), with and without a draft vocabulary."""
    _, drafter = build()
    if vocab:
        drafter = JetSpecDrafter(drafter.model.restrict_vocab(list(range(3, 3 + vocab))))
    low = drafter.with_dtype(torch.bfloat16)
    for new in (1, 3):
        inputs = draft_inputs(drafter.model, context=20, new=new, blocks=2)
        low_inputs = draft_inputs(low.model, context=20, new=new, blocks=2)
        with torch.no_grad():
            exact, _ = drafter.step(**inputs)
            approx, kv = low.step(**low_inputs)
        assert approx.dtype == torch.float32 and kv[0][0].dtype == torch.bfloat16
        assert approx.shape == exact.shape == (2, drafter.model.cfg.depth, vocab or VOCAB)
        torch.testing.assert_close(approx.exp(), exact.exp(), atol=0.02, rtol=0)


@needs_bf16
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_bf16_drafter_is_lossless(family):
    target, drafter = build(family)
    spec = js.optimize(target, drafter=drafter, budget=6, max_cache_len=96, fallback=False, drafter_dtype="bfloat16")
    assert spec.runtime_drafter().model.fc.weight.dtype == torch.bfloat16
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert torch.equal(spec.generate(ids, max_new_tokens=20), expected)
    assert spec.last_stats["drafter_calls"] > 0
