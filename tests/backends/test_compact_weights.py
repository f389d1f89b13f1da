"""Models whose fp32 weights are exactly bf16 or 4-bit (Q4_1): the verify graphs read the compact forms and the
output stays HF generate's, on the eager and the Inductor backend; with ``compact_weights="off"`` nothing changes."""

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.counters import counters as JETSPEC
from jetspec_compile.drafter import NGramDrafter
from jetspec_compile.kernels import compact_linear
from jetspec_compile.kernels.cpu_linear import MAX_ROWS
from tests.families import VOCAB, make_model, with_exact_weights

pytestmark = pytest.mark.skipif(not compact_linear.kernels_available(),
                                reason=f"compact-weight kernels did not build here: {compact_linear.build_error()}")


def _prompt(seed=1):
    return torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(seed))


def _expected(model, ids, new_tokens):
    model.generation_config.eos_token_id = None
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)


def _compact_nodes(graph_module) -> int:
    return sum(1 for n in graph_module.graph.nodes
               if n.op == "call_function" and "jetspec_cpu" in str(getattr(n.target, "name", lambda: "")()))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("form", ["q4", "bf16"])
def test_eager_reads_compact_weights_and_stays_lossless(family, form):
    model = with_exact_weights(make_model(family), form)
    ids = _prompt()
    expected = _expected(model, ids, 40)
    spec = js.optimize(model, budget=8, max_cache_len=128, drafter=NGramDrafter())  # fallback: budget 1 too
    assert torch.equal(spec.generate(ids, max_new_tokens=40), expected)
    graphs = spec.verifier(1)._graphs
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    # decoding (1 row) and verify (8) graphs read every layer's weights compactly; the prefill chunk graph (more
    # rows than MAX_ROWS) keeps its fp32 GEMMs
    assert {n: _compact_nodes(g) for n, g in graphs.items()} == {n: linears if n <= MAX_ROWS else 0 for n in graphs}
    assert {1, 8} <= set(graphs)
    off = js.optimize(model, budget=8, max_cache_len=128, drafter=NGramDrafter(), compact_weights="off")
    assert torch.equal(off.generate(ids, max_new_tokens=40), expected)
    assert all(_compact_nodes(g) == 0 for g in off.verifier(1)._graphs.values())


def test_eager_leaves_weights_without_an_exact_form_alone():
    model = make_model("llama")  # random fp32 weights
    spec = js.optimize(model, budget=8, max_cache_len=128, drafter=NGramDrafter())
    ids = _prompt(2)
    assert torch.equal(spec.generate(ids, max_new_tokens=20), _expected(model, ids, 20))
    assert all(_compact_nodes(g) == 0 for g in spec.verifier(1)._graphs.values())


def test_inductor_reads_compact_weights_and_stays_lossless():
    from torch._inductor import config

    model = with_exact_weights(make_model("llama"), "q4")
    ids = _prompt(3)
    expected = _expected(model, ids, 60)
    JETSPEC["inductor"].clear()
    with config.patch(fx_graph_cache=False):  # a cache hit would skip the post-grad pass we count with
        spec = js.optimize(model, backend="inductor", budget=8, max_cache_len=256, drafter=NGramDrafter(),
                           fallback=False)
        assert torch.equal(spec.generate(ids, max_new_tokens=60), expected)
    # the verify graph (8 rows): q/k/v and gate/up concatenated, so 4 GEMMs per layer, every one compact; the
    # prefill chunk graph has more rows than MAX_ROWS and keeps its fp32 GEMMs
    assert JETSPEC["inductor"]["compiles"] == 2
    assert JETSPEC["inductor"]["compact_linears"] == 4 * model.config.num_hidden_layers
