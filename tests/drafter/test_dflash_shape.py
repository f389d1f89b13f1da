"""The DFlash drafter shape (``style="dflash"``): in-place MASK prediction, q/k norms, optional bidirectional
block; trained like the default shape, drafted with the same trees."""

import dataclasses

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.drafter import DrafterConfig, JetSpecDrafter, ParallelDrafter
from jetspec_compile.training.train import block_mask, evaluate, train_drafter
from tests.training.test_train import setup, small  # noqa: F401  (the fixture and the short schedule)
from tests.families import VOCAB, make_model


def dflash(target, causal, block=5):
    cfg = DrafterConfig.for_target(target.config, (0, 1), num_layers=1, block_size=block, style="dflash",
                                   causal=causal, mask_token_id=VOCAB - 1)
    return ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings()).eval()


@pytest.mark.parametrize("causal", [True, False])
def test_training_blocks_equal_runtime_drafting_and_depths_are_block_minus_one(causal):
    target = make_model("llama")
    drafter = dflash(target, causal)
    assert drafter.cfg.depth == 4 and {"layers.0.q_norm.weight", "layers.0.k_norm.weight"} <= set(drafter.state_dict())
    length, s = 20, drafter.cfg.block_size
    ids = torch.randint(3, VOCAB - 1, (length,))
    hidden = torch.randn(length, 2 * target.config.hidden_size)
    anchors = torch.tensor([5, 9, 14])
    positions = (anchors[:, None] + torch.arange(s)[None]).reshape(1, -1)
    with torch.no_grad():
        ctx = drafter.context_kv(hidden[None], torch.arange(length)[None])
        batched = drafter(ids[anchors][None], positions, ctx, block_mask(anchors, length, s, causal))[0]
    assert batched.shape == (3, 4, VOCAB)
    for m, a in enumerate(anchors.tolist()):
        runtime = JetSpecDrafter(drafter)
        runtime.begin([ids[:a].tolist()], [hidden[:a]])
        torch.testing.assert_close(batched[m].log_softmax(-1), runtime.depth_logprobs(0, int(ids[a])), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_revealing_depth_one_conditions_the_later_depths(causal):
    """Path-conditioned branches: block ``[root, token, MASK...]``; depth 1's slot now holds its token (its
    output is not used for the branch), the later depths see it."""
    target = make_model("llama")
    drafter = dflash(target, causal)
    runtime = JetSpecDrafter(drafter)
    runtime.begin([[1] * 10], [torch.randn(10, 2 * target.config.hidden_size)])
    plain = runtime._block_logprobs(0, 7, [None])
    given = runtime._block_logprobs(0, 7, [None, 11])
    torch.testing.assert_close(given[0], plain[0])  # blocks do not see each other
    assert not torch.allclose(given[1, 1:], plain[0, 1:])


def test_the_dflash_shape_trains_and_drafts_losslessly(setup, tmp_path):  # noqa: F811
    target, feats, cfg = setup
    cfg = dataclasses.replace(cfg, style="dflash", causal=False, mask_token_id=VOCAB - 1)
    before = evaluate(train_drafter(target, feats[4:], cfg, small(epochs=1, lr=0.0), tmp_path / "zero",
                                    progress=False), feats[:4])
    trained = train_drafter(target, feats[4:], cfg, small(reveal_prob=0.3), tmp_path / "a", progress=False)
    after = evaluate(trained, feats[:4])
    assert len(after) == cfg.block_size - 1
    assert after[0] > before[0] + 0.1 and sum(after) > sum(before)
    spec = js.attach_drafter(target, JetSpecDrafter(trained, width=3, path_branches=2), budget=10, max_cache_len=128)
    ids = feats[0][0][None, :8]
    ref = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    assert torch.equal(spec.generate(ids, max_new_tokens=24), ref)


def test_config_rules():
    target = make_model("llama")
    with pytest.raises(ValueError, match="block_size >= 2"):
        DrafterConfig.for_target(target.config, (0,), block_size=1, style="dflash")
    with pytest.raises(ValueError, match="style must be"):
        DrafterConfig.for_target(target.config, (0,), style="medusa")
    with pytest.raises(ValueError, match="mask_token_id"):
        DrafterConfig.for_target(target.config, (0,), style="dflash", mask_token_id=VOCAB)
    old = DrafterConfig.for_target(target.config, (0,))
    assert DrafterConfig.from_json(old.to_json()) == old and old.depth == old.block_size  # the default is unchanged
