"""The parallel drafter inside the runtime: lossless whatever it proposes, fed by the verify graph's taps."""

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.drafter import DrafterConfig, JetSpecDrafter, ParallelDrafter, save_drafter
from tests.families import VOCAB, make_model


def build(family="qwen3", width=3):
    target = make_model(family)
    cfg = DrafterConfig.for_target(target.config, (0, 2), num_layers=1, block_size=5)
    return target, ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings())


def test_attach_drafter_generates_losslessly_and_uses_drafter_taps(tmp_path):
    target, net = build()
    spec = js.attach_drafter(target, net, budget=10, max_cache_len=128)
    assert spec.verifier(1).tap_layers == (0, 2)
    ids = torch.randint(3, VOCAB, (1, 11))
    expected = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    assert torch.equal(spec.generate(ids, max_new_tokens=30), expected)
    # from a checkpoint folder, batch of 2
    save_drafter(net, tmp_path / "d")
    spec = js.attach_drafter(target, tmp_path / "d", budget=10, max_cache_len=128)
    ids2 = torch.randint(3, VOCAB, (2, 9))
    expected = target.generate(ids2, attention_mask=torch.ones_like(ids2), max_new_tokens=20, do_sample=False)
    assert torch.equal(spec.generate(ids2, max_new_tokens=20), expected)


def test_context_the_drafter_sees_is_the_targets_hidden_states():
    target = make_model("qwen3")
    cfg = DrafterConfig.for_target(target.config, (0, 1), num_layers=1, block_size=5)
    net = ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings())
    seen = []

    class Spy(JetSpecDrafter):
        def begin(self, prompts, hidden):
            seen.append((prompts[0], hidden[0]))
            super().begin(prompts, hidden)

    spec = js.optimize(target, drafter=Spy(net), budget=6, max_cache_len=64)
    ids = torch.randint(3, VOCAB, (1, 9))
    spec.generate(ids, max_new_tokens=3)
    prompt, hidden = seen[0]
    with torch.no_grad():
        out = target(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(hidden, torch.cat([out.hidden_states[1][0], out.hidden_states[2][0]], -1),
                               atol=1e-4, rtol=1e-4)


def test_training_features_equal_runtime_taps():
    from jetspec_compile.training.train import compute_features

    target = make_model("llama")
    ids = torch.randint(3, VOCAB, (30,)).tolist()
    ((feat_ids, hidden, prompt_len),) = compute_features(target, [{"prompt_ids": ids[:10], "response_ids": ids[10:]}],
                                                         (0, 2), progress=False)
    v = js.TreeVerifier(target, max_cache_len=64, budget=8, tap_layers=(0, 2))
    _, expected = v.prefill(torch.tensor([ids]))
    assert prompt_len == 10 and feat_ids.tolist() == ids
    torch.testing.assert_close(hidden.float(), expected[0], atol=1e-2, rtol=1e-2)  # stored in fp16


def test_path_conditioned_drafting_is_lossless_and_reshapes_the_tree():
    target, net = build("llama")
    ids = torch.randint(3, VOCAB, (1, 10))
    expected = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=25, do_sample=False)
    trees = {}
    hidden = torch.randn(10, 2 * target.config.hidden_size)
    for branches in (0, 2):
        drafter = JetSpecDrafter(net, width=3, path_branches=branches)
        spec = js.optimize(target, drafter=drafter, budget=12, max_cache_len=128, fallback=False)
        assert torch.equal(spec.generate(ids, max_new_tokens=25), expected)
        drafter.begin([ids[0].tolist()], [hidden])
        trees[branches] = drafter.draft([5], 12)[0]
    assert trees[0].tokens[:2] == trees[2].tokens[:2]  # same root and best depth-1 token
    assert trees[0].tokens != trees[2].tokens  # deeper nodes follow their own branch
    with pytest.raises(ValueError, match="path_branches"):
        JetSpecDrafter(net, path_branches=-1)


def test_fast_training_features_equal_runtime_taps():
    """Taps before the last layer come from one plain HF forward; they must equal what the verify graph taps."""
    from jetspec_compile.training.train import compute_features

    target = make_model("qwen3")
    ids = torch.randint(3, VOCAB, (40,)).tolist()
    ((_, hidden, _),) = compute_features(target, [{"prompt_ids": ids[:12], "response_ids": ids[12:]}], (0, 1),
                                         progress=False)
    v = js.TreeVerifier(target, max_cache_len=64, budget=8, tap_layers=(0, 1))
    _, expected = v.prefill(torch.tensor([ids]))
    torch.testing.assert_close(hidden.float(), expected[0], atol=1e-2, rtol=1e-2)  # stored in fp16
