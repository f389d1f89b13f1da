"""jetspec::tree_attention: the torch reference is SDPA over the dense tree mask, the Triton kernel (run by
Triton's interpreter on CPU) equals the reference, the op traces, and the lowering pass keeps the logits."""

import copy
import dataclasses
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import FileCheck

from jetspec_compile.compiler import build_verify_step
from jetspec_compile.errors import UnsupportedModelError
from jetspec_compile.kernels import ancestor_bits, slot_nodes, tree_attention_reference, tree_attention_triton
from jetspec_compile.passes import KERNEL_LOWERING_PASSES, LOWERING_PASSES, PassManager
from jetspec_compile.tree import TreeSpec, ancestor_mask, depths, tree_attention_mask
from tests.families import VOCAB, make_model
from tests.reference import random_tree

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install -e '.[kernels]')")

#: case name -> make_case arguments; every case runs in fp32 and bf16
CASES = {
    "single_node": dict(n=1, length=9),
    "chain": dict(n=8, length=40, kind="chain"),
    "tree_64": dict(n=64, length=100),
    "tree_70_two_words": dict(n=70, length=140),
    "cache_holes": dict(n=12, length=70, batch=2, holes=True),
    "gqa": dict(n=12, length=50, heads=6, kv_heads=2),
    "sliding_window": dict(n=16, length=80, batch=2, holes=True, window=8, kind="deep"),
    "scattered_slots": dict(n=10, length=60, scattered=True, window=12),
}


def make_case(*, n, length, batch=1, heads=2, kv_heads=2, head_dim=8, kind="random", holes=False,
              window=-1, scattered=False, dtype=torch.float32, seed=0):
    """The op's arguments for ``batch`` random trees of ``n`` nodes written into a cache of ``length`` slots."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype)
    start = length - n - rng.randrange(0, 4)  # committed prefix; a few unused slots after the tree
    valid = (torch.arange(length) < start).expand(batch, length).clone()
    if holes:  # left padding and dropped slots
        valid &= torch.rand(batch, length, generator=gen) > 0.3
    positions_all = torch.arange(length + 7).expand(batch, length + 7) + torch.arange(batch)[:, None]
    cache_positions = positions_all[:, :length]  # a strided view, like the runtime's cache slice
    if scattered:
        write_slots = torch.randperm(length, generator=gen)[:n]
        valid[:, write_slots] = False
    else:
        write_slots = torch.arange(start, start + n)
    trees = [TreeSpec.chain(n) if n == 1 else random_tree(kind, n, rng) for _ in range(batch)]
    tree_mask = torch.stack([ancestor_mask(t) for t in trees])  # [B, N, N]
    positions = torch.stack([depths(t) for t in trees]) + start  # [B, N]
    return q, k, v, valid, cache_positions, write_slots, tree_mask, positions, window, head_dim ** -0.5


@pytest.mark.parametrize("name", ["single_node", "gqa", "sliding_window", "scattered_slots"])
def test_reference_is_sdpa_over_the_dense_tree_mask(name):
    args = make_case(**CASES[name])
    q, k, v, valid, cache_positions, write_slots, tree_mask, positions, window, scale = args
    mask = tree_attention_mask(tree_mask, valid, cache_positions, write_slots, positions,
                               None if window < 0 else window, q.dtype)
    group = q.shape[1] // k.shape[1]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=scale)
    torch.testing.assert_close(tree_attention_reference(*args), expected)
    torch.testing.assert_close(torch.ops.jetspec.tree_attention(*args), expected)  # CPU kernel: the reference


def test_compact_tree_representation_round_trips():
    tree_mask = ancestor_mask(random_tree("random", 70, random.Random(1)))[None]  # [1, 70, 70]; two words
    bits = ancestor_bits(tree_mask)  # [1, 70, 2]
    assert bits.shape == (1, 70, 2) and bits.dtype == torch.int64
    decoded = torch.stack([(bits[..., j // 64] >> (j % 64)) & 1 for j in range(70)], dim=-1).bool()
    assert torch.equal(decoded, tree_mask)
    assert bool((bits[0, 63, 0] < 0).item())  # node 63 sees itself: bit 63 is the sign bit
    nodes = slot_nodes(torch.tensor([5, 2, 9]), 12)
    assert nodes.tolist() == [-1, -1, 1, -1, -1, 0, -1, -1, -1, 2, -1, -1] and nodes.dtype == torch.int32


def check_triton_kernel() -> dict[str, str]:
    """Every case in fp32 and bf16, plus small blocks: ``{case: "ok" or the mismatch}``. Needs the interpreter."""
    results = {}
    runs = [(f"{name}-{str(dtype)[6:]}", CASES[name], dtype, {}) for name in CASES
            for dtype in (torch.float32, torch.bfloat16)]
    runs.append(("small_blocks-float32", CASES["sliding_window"], torch.float32, dict(block_m=4, block_n=16)))
    for label, case, dtype, blocks in runs:
        args = make_case(**case, dtype=dtype)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1.6e-2)
        try:
            actual = tree_attention_triton(*args, **blocks)
            assert actual.dtype == dtype
            torch.testing.assert_close(actual, tree_attention_reference(*args), **tol)
            results[label] = "ok"
        except Exception as err:  # reported by the test in the parent process
            results[label] = f"{type(err).__name__}: {err}"
    return results


@needs_triton
def test_triton_kernel_equals_reference_under_the_interpreter():
    # triton.language's helpers are wrapped for the interpreter only if the flag is set before triton is
    # imported (torch imports it on the first custom-op call), so the kernel runs in a fresh process
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.test_tree_attention"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(CASES) + 1
    assert {k: v for k, v in results.items() if v != "ok"} == {}


@needs_triton
def test_triton_kernel_on_cpu_needs_the_interpreter_from_process_start(monkeypatch):
    import triton

    if not isinstance(triton.language.max, triton.runtime.JITFunction):
        pytest.skip("this session was started with TRITON_INTERPRET=1")
    args = make_case(**CASES["single_node"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1, or use tree_attention_reference"):
        tree_attention_triton(*args)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late: triton is imported
    with pytest.raises(RuntimeError, match="before the process starts"):
        tree_attention_triton(*args)


def test_op_checks_shapes():
    args = list(make_case(**CASES["gqa"]))
    args[6] = args[6][:, :5]  # tree_mask [B, 5, N]
    with pytest.raises(ValueError, match="tree_mask has shape"):
        torch.ops.jetspec.tree_attention(*args)


def test_opcheck_fake_tensor_and_dispatch():
    args = make_case(**CASES["sliding_window"])
    results = torch.library.opcheck(torch.ops.jetspec.tree_attention.default, args)  # schema, fake, autograd, aot
    assert set(results.values()) == {"SUCCESS"}


@pytest.fixture(scope="module")
def llama_step():
    step, _ = build_verify_step(make_model("llama"), budget=12)
    PassManager(LOWERING_PASSES)(step)
    return step


def _copy(step):
    return dataclasses.replace(step, graph_module=copy.deepcopy(step.graph_module))


def _verify_inputs(step, start=30, length=64):
    """One tree of 12 nodes after a committed prefix of ``start`` slots, with random cache contents."""
    gen = torch.Generator().manual_seed(0)
    tree = random_tree("deep", 12, random.Random(0))
    kv = step.kv
    inputs = {
        "input_ids": torch.randint(3, VOCAB, (1, 12), generator=gen),
        "base_position": torch.tensor([start]),
        "depth": depths(tree)[None],
        "write_slots": torch.arange(start, start + 12),
        "tree_mask": ancestor_mask(tree)[None],
        "cache_valid": torch.arange(length)[None] < start,
        "cache_positions": torch.arange(length)[None],
    }
    for name in kv.cache_names():
        inputs[name] = torch.randn(1, kv.heads, length, kv.head_dim, generator=gen)
    return inputs


def test_pass_replaces_masks_and_attention_and_keeps_logits(llama_step):
    lowered = _copy(llama_step)
    result = PassManager(KERNEL_LOWERING_PASSES[-1:], run_checks_after_each_pass=True)(lowered)
    layers = llama_step.num_layers
    assert result["use_tree_attention_op"].stats == {"attention_tree_op": layers, "masks_removed": 1}
    code = lowered.graph_module.code
    FileCheck().check_not("tree_attention_mask").check_not("scaled_dot_product_attention").run(code)
    FileCheck().check_count("torch.ops.jetspec.tree_attention.default", layers, exactly=True).run(code)
    with torch.no_grad():
        expected = llama_step.graph_module(**_verify_inputs(llama_step))  # (logits, hidden)
        actual = lowered.graph_module(**_verify_inputs(lowered))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_pass_refuses_an_attention_it_cannot_express(llama_step):
    broken = _copy(llama_step)
    attn = next(n for n in broken.graph_module.graph.nodes if n.meta.get("jetspec") == "tree_attention")
    attn.kwargs = {**attn.kwargs, "is_causal": True}
    with pytest.raises(UnsupportedModelError, match="is not SDPA"):
        PassManager(KERNEL_LOWERING_PASSES[-1:])(broken)


@pytest.mark.slow
def test_inductor_compiles_the_op_as_an_extern_call(llama_step):
    from jetspec_compile.backends.inductor import jetspec_backend

    lowered = _copy(llama_step)
    PassManager(KERNEL_LOWERING_PASSES[-1:])(lowered)
    compiled = torch.compile(lowered.graph_module, backend=jetspec_backend, fullgraph=True)
    with torch.no_grad():
        expected = llama_step.graph_module(**_verify_inputs(llama_step))
        actual = compiled(**_verify_inputs(lowered))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


if __name__ == "__main__":  # the interpreter run of test_triton_kernel_equals_reference_under_the_interpreter
    torch.set_num_threads(1)
    print(json.dumps(check_triton_kernel()))
