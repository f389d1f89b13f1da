import functools
import importlib

import pytest
import torch

from jetspec_compile import TreeVerifier
from jetspec_compile.backends import lower_eager
from jetspec_compile.compiler import build_verify_step
from jetspec_compile.passes import prepack_linear_weights, prepack_supported
from jetspec_compile.kernels.cpu_linear import MAX_ROWS, MIN_ROWS, available_kernels, choose_kernel
from tests.families import VOCAB, make_model
from tests.reference import assert_same_tree_verify

module = importlib.import_module("jetspec_compile.kernels.cpu_linear")
pytestmark = pytest.mark.skipif(not prepack_supported(), reason="this PyTorch build has neither MKL nor oneDNN")

OPS = {"mkl": torch.ops.mkl._mkl_linear.default, "onednn": torch.ops.mkldnn._linear_pointwise.default}


@pytest.fixture(params=available_kernels() or ["none"])
def kernel(request, monkeypatch):
    """Each packed kernel this build has, forced through JETSPEC_CPU_LINEAR (``auto`` would pick by timing)."""
    monkeypatch.setenv("JETSPEC_CPU_LINEAR", request.param)
    return request.param


def _count(gm, target):
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def _packed_count(gm):
    return sum(_count(gm, op) for op in OPS.values())


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D as addmm, biases; llama: bias-free linears
def test_packed_graph_matches_the_plain_one(family, kernel):
    model = make_model(family)
    plain = TreeVerifier(model, max_cache_len=96, budget=12, compile_fn=functools.partial(lower_eager, prepack=False))
    packed = TreeVerifier(model, max_cache_len=96, budget=12, compile_fn=lower_eager)
    linears = _count(plain.graph, torch.ops.aten.linear.default)
    assert _count(packed.graph, OPS[kernel]) == linears
    assert _count(packed.graph, torch.ops.aten.linear.default) == 0
    assert_same_tree_verify(plain, packed, VOCAB, tol=1e-4)


def test_only_small_fp32_cpu_graphs_are_packed():
    model = make_model("llama")
    step, _ = build_verify_step(model, budget=MAX_ROWS + 1)  # too many rows: the GEMM packs cheaply itself
    result = prepack_linear_weights(step)
    assert not result.modified and _packed_count(step.graph_module) == 0
    step, _ = build_verify_step(model, budget=MIN_ROWS - 1)  # one row: a GEMV needs no packing
    assert not prepack_linear_weights(step).modified
    step, _ = build_verify_step(model.to(torch.bfloat16), budget=4)  # fp32 only (MKL's packed GEMM is)
    assert not prepack_linear_weights(step).modified


def test_shared_weights_are_packed_once(kernel):
    model = make_model("llama")
    first, second = model.model.layers[0].mlp, model.model.layers[1].mlp
    for name in ("gate_proj", "up_proj", "down_proj"):  # one weight used by two layers' linears
        getattr(second, name).weight = getattr(first, name).weight
    step, _ = build_verify_step(model, budget=4)
    stats = prepack_linear_weights(step).stats
    gm = step.graph_module
    packed = [n.args[1].target for n in gm.graph.nodes if n.op == "call_function" and n.target is OPS[kernel]]
    assert stats["linears_prepacked"] == len(packed) == stats[f"{kernel}_linears"] == 3 * 7 + 1
    assert stats["weights_packed"] == len(set(packed)) == len(packed) - 3


def test_graphs_of_one_row_count_share_packed_weights_and_repack_after_an_update(kernel):
    model = make_model("llama")
    small, _ = build_verify_step(model, budget=4)
    large, _ = build_verify_step(model, budget=12)
    for step in (small, large):
        prepack_linear_weights(step)
    packed = lambda step: dict(step.graph_module.named_buffers())  # noqa: E731
    a, b = packed(small), packed(large)
    names = [k for k in a if k.startswith("_jetspec_packed_")]
    assert names and not any(a[k] is b[k] for k in names)  # packed per row count (another count runs unpacked-slow)
    twin, _ = build_verify_step(model, budget=12)
    prepack_linear_weights(twin)
    assert all(packed(twin)[k] is b[k] for k in names)  # the same row count shares one copy
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)  # an in-place update must not run against the stale packed copy
    again, _ = build_verify_step(model, budget=4)
    prepack_linear_weights(again)
    x = torch.randn(1, 4, model.config.hidden_size)
    node = next(n for n in again.graph_module.graph.nodes if n.op == "call_function" and n.target is OPS[kernel]
                and n.meta["val"].shape[-1] == VOCAB)
    out = module.run_packed(kernel, x, getattr(again.graph_module, node.args[1].target), model.lm_head.weight, None, 4)
    torch.testing.assert_close(out, x @ model.lm_head.weight.t(), atol=1e-4, rtol=1e-4)


def test_drafter_step_with_packed_linears_matches_the_plain_step(monkeypatch, kernel):
    """The runtime's draft step runs its linears (and the draft-vocabulary head) from packed weights; same
    numbers as the plain step, the drafter's own modules untouched and no parameter copied."""
    from jetspec_compile.drafter import DrafterConfig, ParallelDrafter
    from jetspec_compile.drafter.step import DraftStep
    from jetspec_compile.kernels.cpu_linear import PackedLinear

    target = make_model("llama")
    cfg = DrafterConfig.for_target(target.config, (0, 1), num_layers=2, block_size=4)
    net = ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings()).eval()
    net.restrict_vocab(torch.arange(3, 40))
    plain, packed = DraftStep(net), DraftStep(net, packed=True)
    assert not any(isinstance(m, PackedLinear) for m in net.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == sum(
        isinstance(m, torch.nn.Linear) for m in net.modules())
    assert {id(p) for p in packed.parameters()} <= {id(p) for p in net.parameters()} | {
        id(p) for p in target.parameters()}
    calls = []
    run = module.run_packed
    monkeypatch.setattr(module, "run_packed", lambda k, x, *a: calls.append((k, x.shape[0])) or run(k, x, *a))
    gen = torch.Generator().manual_seed(0)
    kv = cfg.num_kv_heads, cfg.head_dim
    past = [(torch.randn(1, kv[0], 6, kv[1], generator=gen), torch.randn(1, kv[0], 6, kv[1], generator=gen))
            for _ in range(2)]
    inputs = dict(hidden=torch.randn(1, 3, 2 * cfg.target_hidden_size, generator=gen),
                  positions=torch.arange(6, 9)[None], anchors=torch.tensor([[5]]),
                  revealed=torch.full((1, 1, 3), -1), block_positions=torch.arange(9, 13)[None], past=past)
    with torch.no_grad():
        (a, kv_a), (b, kv_b) = plain(**inputs), packed(**inputs)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    for x, y in zip(kv_a, kv_b):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4)
    assert (kernel, 3) in calls and (kernel, 4) in calls  # the 3 new context tokens and the 4-token block ran packed



def test_packed_linear_mode_runs_every_multi_row_linear_from_one_copy(monkeypatch, kernel):
    """A prefill under ``PackedLinearMode``: every linear of two rows or more runs packed, from one copy per
    weight packed for ``PREFILL_ROWS`` whatever the prompt's length; a one-row linear (the LM head at the last
    position) stays the GEMV; the same numbers as the model's own forward; nothing routed outside the mode."""
    from jetspec_compile.kernels.cpu_linear import PREFILL_ROWS, PackedLinearMode

    model = make_model("llama")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    calls = []
    run = module.run_packed
    monkeypatch.setattr(module, "_PACKED", {})
    monkeypatch.setattr(module, "run_packed",
                        lambda k, x, packed, w, b, rows: calls.append((k, x.shape[0], rows, id(w))) or run(
                            k, x, packed, w, b, rows))
    mode = PackedLinearMode(kernel)
    for length in (5, 40):  # shorter and longer than MAX_ROWS: one packed copy serves both
        ids = torch.randint(3, VOCAB, (1, length))
        with torch.no_grad():
            expected = model(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
            assert not calls  # outside the mode the model's own linears run
            with mode:
                got = model(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
        for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert {c[:3] for c in calls} == {(kernel, length, PREFILL_ROWS)}
        assert {c[3] for c in calls} == {id(m.weight) for m in linears if m is not model.lm_head}
        calls.clear()
    assert {id(m.weight): set(module._PACKED[id(m.weight)][2]) for m in linears if m is not model.lm_head} == {
        id(m.weight): {PREFILL_ROWS} for m in linears if m is not model.lm_head}


def test_model_prefill_on_packed_linears_fills_the_state_of_the_plain_one(monkeypatch, kernel):
    """``TreeVerifier(prefill_linear=...)``: the model's prefill forward runs packed (what ``optimize`` sets up
    on CPU) and commits the same cache, taps and logits as the model's own linears."""
    model = make_model("llama")
    kw = dict(max_cache_len=128, batch_size=2, budget=8, tap_layers=(0, 1), self_check=False)
    plain, packed = TreeVerifier(model, **kw), TreeVerifier(model, prefill_linear=kernel, **kw)
    ids = torch.randint(3, VOCAB, (2, 37))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # a left-padded row
    expected = plain.prefill(ids, mask)
    calls = []
    run = module.run_packed
    monkeypatch.setattr(module, "run_packed", lambda k, x, *a: calls.append(k) or run(k, x, *a))
    got = packed.prefill(ids, mask)
    assert packed._model_prefill and calls and set(calls) == {kernel}
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    slots = plain.cache.valid[None, :, None, :, None].expand_as(plain.cache.kv)
    torch.testing.assert_close(packed.cache.kv[slots], plain.cache.kv[slots], atol=1e-4, rtol=1e-4)


def test_auto_takes_the_faster_kernel_per_shape(monkeypatch):
    """``auto`` times both kernels once per (out, in, rows) and takes the faster; the pass then mixes them."""
    if len(available_kernels()) < 2:
        pytest.skip(f"only {available_kernels()} in this build: nothing to choose between")
    monkeypatch.delenv("JETSPEC_CPU_LINEAR", raising=False)
    model = make_model("llama")
    h, v = model.config.hidden_size, model.config.vocab_size
    timings = dict(module.TIMINGS)
    monkeypatch.setattr(module, "TIMINGS", timings)
    monkeypatch.setattr(module, "_PACKED", {})
    timings[(v, h, 4)] = {"mkl": 2.0, "onednn": 1.0}  # the LM head: oneDNN "measured" faster
    assert choose_kernel(v, h, 4) == "onednn" and choose_kernel(v, h, 4, "mkl") == "mkl"
    measured = choose_kernel(h, h, 4)  # not seeded: measured now, and memoized
    square = timings[(h, h, 4)]
    assert set(square) == {"mkl", "onednn"} and measured == min(square, key=square.get)
    for key in list(timings):
        if key != (v, h, 4):
            timings[key] = {"mkl": 1.0, "onednn": 2.0}
    for out_f, in_f in {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, torch.nn.Linear)}:
        timings.setdefault((out_f, in_f, 4), {"mkl": 1.0, "onednn": 2.0})
    step, _ = build_verify_step(model, budget=4)
    stats = prepack_linear_weights(step).stats
    assert stats["onednn_linears"] == 1 and stats["mkl_linears"] == 3 * 7


def test_auto_times_weights_read_from_memory(monkeypatch):
    """The timing cycles through distinct weights worth more than the cache (a forward streams every layer's
    weight once), at most ``MAX_COPIES`` of them."""
    if not available_kernels():
        pytest.skip("no packed kernels in this build")
    seen = {}
    real = module.run_packed

    def spy(kernel, x, packed, weight, bias, rows):
        seen.setdefault(kernel, set()).add(weight.data_ptr())
        return real(kernel, x, packed, weight, bias, rows)

    monkeypatch.setattr(module, "TIMINGS", {})
    monkeypatch.setattr(module, "run_packed", spy)
    monkeypatch.setattr(module, "STREAM_BYTES", 4 * 64 * 32 * 5)  # five 64 x 32 fp32 weights' worth
    module._time_kernels(64, 32, 1, reps=1)
    assert set(seen) == set(available_kernels()) and all(len(ptrs) == 5 for ptrs in seen.values())
    seen.clear()
    monkeypatch.setattr(module, "MAX_COPIES", 3)
    module._time_kernels(32, 32, 1, reps=1)
    assert all(len(ptrs) == 3 for ptrs in seen.values())


def test_a_bad_kernel_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("JETSPEC_CPU_LINEAR", "blas")
    with pytest.raises(ValueError, match="JETSPEC_CPU_LINEAR.*'auto', 'mkl', 'onednn'.*'blas'"):
        choose_kernel(8, 8, 4)
    from jetspec_compile.backends.inductor import lower_inductor

    step, _ = build_verify_step(make_model("llama"), budget=4)
    with pytest.raises(ValueError, match="blas"):
        lower_inductor(step)


@pytest.mark.skipif(not module.bf16_supported(), reason="this PyTorch build has no oneDNN bf16 GEMM")
def test_bf16_linears_run_from_a_onednn_packed_copy(monkeypatch):
    """A bf16 drafter's linears: oneDNN's packed bf16 GEMM (MKL has none) whatever the setting, at every packed row
    count; one row stays a plain GEMV."""
    monkeypatch.setenv("JETSPEC_CPU_LINEAR", "mkl")  # not applicable to bf16: oneDNN all the same
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=g).bfloat16()
    bias = torch.randn(48, generator=g).bfloat16()
    for rows in (1, MIN_ROWS, 8, MAX_ROWS):
        x = torch.randn(rows, 64, generator=g).bfloat16()
        with torch.no_grad():
            out = module.packed_linear(x, weight, bias, setting="mkl")
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), torch.nn.functional.linear(x.float(), weight.float(), bias.float()),
                                   atol=0.05, rtol=0.02)
    packed = module._PACKED[id(weight)][2]
    assert sorted(packed) == [MIN_ROWS, 8, MAX_ROWS] and {k for _, k, _ in packed.values()} == {"onednn"}


def test_packed_linear_mode_leaves_other_dtypes_as_the_model_runs_them():
    """A bf16 target's prefill must round as HF's does (its first token is HF's): the mode packs fp32 only."""
    linear = torch.nn.Linear(64, 48).bfloat16()
    x = torch.randn(8, 64).bfloat16()
    with torch.no_grad():
        expected = linear(x)
        with module.PackedLinearMode():
            out = linear(x)
    assert torch.equal(out, expected) and id(linear.weight) not in module._PACKED
