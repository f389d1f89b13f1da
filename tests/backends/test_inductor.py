"""The Inductor lowering: token-identical to HF generate and to eager, with a bounded number of compiles."""

import pytest
import torch
from torch._dynamo.utils import counters

import jetspec_compile as js
from jetspec_compile.backends import inductor
from jetspec_compile.counters import counters as JETSPEC
from jetspec_compile.drafter import NGramDrafter
from jetspec_compile.kernels.cpu_linear import available_kernels
from tests.families import VOCAB, make_model


def greedy_matches(family, new_tokens, budget=8):
    model = make_model(family)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    JETSPEC["inductor"].clear()
    compiled = js.optimize(model, backend="inductor", budget=budget, max_cache_len=new_tokens + 64,
                           drafter=NGramDrafter(), fallback=False)
    out = compiled.generate(ids, max_new_tokens=new_tokens)
    eager = js.optimize(model, budget=budget, max_cache_len=new_tokens + 64).generate(ids, max_new_tokens=new_tokens)
    assert torch.equal(out, expected) and torch.equal(out, eager)
    return model, len(compiled.verifier(1)._graphs)


def test_inductor_is_lossless_and_compiles_a_bounded_number_of_times(monkeypatch):
    from torch._inductor import config

    if "onednn" in available_kernels():  # the oneDNN linears (auto picks them on SmolLM2-sized weights on AMD)
        monkeypatch.setenv("JETSPEC_CPU_LINEAR", "onednn")
    with config.patch(fx_graph_cache=False):  # a cache hit would skip the post-grad pass we count with
        model, graphs = greedy_matches("llama", 200)
    # two graphs (prefill chunk, verify); the cache view grows in buckets over 200 tokens, but its length is
    # marked dynamic on the first call: one compile per graph (freezing on, as on every CPU model)
    assert graphs == 2
    assert JETSPEC["inductor"]["compiles"] == graphs
    assert JETSPEC["inductor"]["tree_attention_ops"] == model.config.num_hidden_layers
    if "onednn" in available_kernels():  # every linear of both graphs moved off MKL: 7 per layer + the LM head,
        # or 4 per layer where q/k/v and gate/up run as one GEMM each (CONCAT_LINEARS)
        per_layer = 4 if inductor.CONCAT_LINEARS else 7
        assert JETSPEC["inductor"]["onednn_linears"] == graphs * (per_layer * model.config.num_hidden_layers + 1)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "gpt2", "mistral"])
def test_inductor_other_families(family):
    greedy_matches(family, 40)


def test_cpu_lowering_freezes_weights_and_optimize_again_takes_new_weights(monkeypatch):
    """On CPU the weights are compiled in as constants (Inductor packs them for MKL, kept here); after the weights
    change, a new optimize() compiles them again and stays lossless."""
    monkeypatch.setenv("JETSPEC_CPU_LINEAR", "mkl")
    model = make_model("llama")
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    JETSPEC["inductor"].clear()
    counters.clear()
    first = js.optimize(model, backend="inductor", budget=4, max_cache_len=64, drafter=NGramDrafter(), fallback=False)
    before = first.generate(ids, max_new_tokens=8)
    assert JETSPEC["inductor"]["frozen_compiles"] == JETSPEC["inductor"]["compiles"] >= 1
    # freezing took effect: Inductor packed the linears' weights (Dynamo must trace with it on, not only Inductor)
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] >= model.config.num_hidden_layers * 7
    assert JETSPEC["inductor"]["onednn_linears"] == 0  # JETSPEC_CPU_LINEAR=mkl: Inductor's MKL packing is left alone
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.roll(model.lm_head.weight, 1, dims=0))  # another argmax everywhere
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    again = js.optimize(model, backend="inductor", budget=4, max_cache_len=64, drafter=NGramDrafter(), fallback=False)
    assert torch.equal(again.generate(ids, max_new_tokens=8), expected) and not torch.equal(expected, before)


def test_backend_is_registered_by_entry_point():
    from torch._dynamo import list_backends

    assert "jetspec" in list_backends()
    f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2, backend="jetspec")
    x = torch.randn(5)
    torch.testing.assert_close(f(x), torch.nn.functional.gelu(x) * 2)


def test_inductor_with_the_tree_attention_op_is_lossless():
    """The CUDA lowering (attention as the jetspec::tree_attention custom op), forced on CPU where the op runs
    its reference: Inductor must call it as an extern kernel, once per layer, with unchanged output."""
    from functools import partial

    from torch._inductor import config

    model = make_model("qwen3")
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    JETSPEC["inductor"].clear()
    with config.patch(fx_graph_cache=False):
        v = js.TreeVerifier(model, max_cache_len=96, budget=8, self_check=False, prefill_chunk=8,
                            compile_fn=partial(inductor.lower_inductor, kernels=True))
        spec = js.optimize(model, budget=8, max_cache_len=96, fallback=False, self_check=False)
        spec._verifiers[1] = v
        assert torch.equal(spec.generate(ids, max_new_tokens=30), expected)
    code = v.step.graph_module.code
    assert "jetspec.tree_attention" in code and "tree_attention_mask" not in code
    assert JETSPEC["inductor"]["tree_attention_ops"] == model.config.num_hidden_layers


def test_inductor_runs_the_drafter_step_from_a_compiled_package(tmp_path):
    """On CPU the inductor backend compiles the drafter's step ahead of time (both drafter shapes): same output as
    HF, and the package is cached for the next start."""
    from jetspec_compile.backends import aoti
    from jetspec_compile.drafter import DrafterConfig, JetSpecDrafter, ParallelDrafter
    from jetspec_compile.kernels import cpu_linear

    model = make_model("llama")
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    for shape in ({"style": "jetspec"}, {"style": "dflash", "mask_token_id": VOCAB - 1}):
        cfg = DrafterConfig.for_target(model.config, (0, 1), num_layers=1, block_size=4, **shape)
        drafter = JetSpecDrafter(ParallelDrafter(cfg, model.get_input_embeddings(), model.get_output_embeddings()))
        # fp32: the package and the eager step draft the same trees (bf16 ones could round differently)
        eager = js.optimize(model, drafter=drafter, budget=6, max_cache_len=96, fallback=False, self_check=False,
                            drafter_dtype="float32")
        assert torch.equal(eager.generate(ids, max_new_tokens=24), expected)
        JETSPEC["aoti"].clear()
        spec = js.optimize(model, backend="inductor", artifact_dir=str(tmp_path), drafter=drafter, budget=6,
                           max_cache_len=96, fallback=False, self_check=False, drafter_dtype="float32")
        assert isinstance(spec.runtime_drafter().step_fn, aoti.AotiDraftStep)
        assert torch.equal(spec.generate(ids, max_new_tokens=24), expected)
        _, hidden = spec.verifier(1).prefill(ids)  # the package drafts the trees the eager step drafts
        trees = []
        for runtime in (eager.runtime_drafter(), spec.runtime_drafter()):
            runtime.begin([ids[0].tolist()], [hidden[0]])
            trees.append([(t.tokens, t.tree) for t in runtime.draft([int(expected[0, 10])], 6)])
        assert trees[0] == trees[1] and len(trees[0][0][0]) == 6
        assert JETSPEC["aoti"] == {"compiled": 1, "loaded": 1}
    assert len(list(tmp_path.glob("draft_*.pt2"))) == 2
    if cpu_linear.bf16_supported():  # a bf16 network compiles into a package of its own, as lossless
        spec = js.optimize(model, backend="inductor", artifact_dir=str(tmp_path), drafter=drafter, budget=6,
                           max_cache_len=96, fallback=False, self_check=False, drafter_dtype="bfloat16")
        runtime = spec.runtime_drafter()
        assert isinstance(runtime.step_fn, aoti.AotiDraftStep) and runtime.model.fc.weight.dtype == torch.bfloat16
        assert torch.equal(spec.generate(ids, max_new_tokens=24), expected)
        assert len(list(tmp_path.glob("draft_*.pt2"))) == 3
