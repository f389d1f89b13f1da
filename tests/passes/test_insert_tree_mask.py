import pytest
import torch
from torch.testing import FileCheck

from jetspec_compile import UnsupportedModelError
from jetspec_compile.compiler import build_verify_step
from jetspec_compile.passes import attention_windows
from jetspec_compile.passes.patterns import find_attention_nodes
from jetspec_compile.tree import TreeSpec, ancestor_mask, depths, tree_attention_mask
from tests.families import make_model


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen3_moe"])
def test_every_attention_is_rewritten(family):
    step, results = build_verify_step(make_model(family), budget=4, run_checks=True)
    attention = find_attention_nodes(step.graph_module)
    assert results["insert_tree_mask"].stats["attention_rewritten"] == step.num_layers == len(attention)
    FileCheck().check_count("aten.scaled_dot_product_attention.default(", step.num_layers, exactly=True).run(
        step.graph_module.code)
    for node in attention:
        assert node.kwargs["is_causal"] is False
        assert str(node.kwargs["attn_mask"].meta["jetspec"]).startswith("tree_mask")
    windows = {node.kwargs["attn_mask"].meta["jetspec"] for node in attention}
    assert len(windows) == (2 if family == "gemma3" else 1)


def dense_reference(tree, valid, cache_pos, start, base, window):
    n, length = len(tree), valid.shape[0]
    anc, dep = ancestor_mask(tree), depths(tree)
    out = torch.zeros(n, length, dtype=torch.bool)
    for i in range(n):
        qpos = base + dep[i]
        for j in range(length):
            if start <= j < start + n:
                ok, kpos = bool(anc[i, j - start]), base + dep[j - start]
            else:
                ok, kpos = bool(valid[j]), cache_pos[j]
            out[i, j] = ok and (window is None or qpos - kpos < window)
    return out


@pytest.mark.parametrize("window", [None, 3, 6])
def test_tree_attention_mask_matches_dense_reference(window):
    tree = TreeSpec((-1, 0, 0, 1, 3, 4, 2))
    length, start, base = 16, 5, 4
    valid = torch.tensor([0, 1, 1, 1, 1] + [0] * 11, dtype=torch.bool)  # slot 0 is left padding
    cache_pos = torch.tensor([0, 0, 1, 2, 3] + [0] * 11)
    slots = torch.arange(start, start + len(tree))
    mask = tree_attention_mask(ancestor_mask(tree)[None], valid[None], cache_pos[None], slots,
                               base + depths(tree)[None], window, torch.float32)
    assert mask.shape == (1, 1, len(tree), length)
    expected = dense_reference(tree, valid, cache_pos, start, base, window)
    assert torch.equal(mask[0, 0] == 0, expected)
    assert mask[0, 0][~expected].eq(torch.finfo(torch.float32).min).all()


def test_attention_windows_table():
    cfg = make_model("gemma3").config
    assert attention_windows(cfg, 3) == [8, 8, None]
    assert attention_windows(make_model("mistral").config, 3) == [8, 8, 8]
    assert attention_windows(make_model("llama").config, 3) == [None] * 3
    cfg.layer_types = ["sliding_attention", "chunked_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        attention_windows(cfg, 3)
