import pytest
import torch

from jetspec_compile.drafter import DrafterConfig, JetSpecDrafter, ParallelDrafter
from jetspec_compile.training.train import block_mask
from tests.families import VOCAB, make_model


def tiny_drafter(family="llama", block=4):
    target = make_model(family)
    cfg = DrafterConfig.for_target(target.config, (0, 1), num_layers=1, block_size=block)
    return target, ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings())


def test_shared_modules_are_not_parameters_or_saved():
    target, drafter = tiny_drafter()
    shared = {target.lm_head.weight.data_ptr(), target.get_input_embeddings().weight.data_ptr()}
    assert all(t.data_ptr() not in shared for t in drafter.state_dict().values())
    assert all(VOCAB not in t.shape for t in drafter.state_dict().values())
    assert drafter.lm_head is target.lm_head


def test_blocks_do_not_see_each_other_and_training_matches_inference():
    """Batched training blocks (block_mask) give the same logits as the runtime drafting one block at a time."""
    target, drafter = tiny_drafter()
    drafter.eval()
    length, s = 20, drafter.cfg.block_size
    ids = torch.randint(3, VOCAB, (length,))
    hidden = torch.randn(length, 2 * target.config.hidden_size)
    anchors = torch.tensor([5, 9, 14])
    positions = (anchors[:, None] + torch.arange(s)[None]).reshape(1, -1)
    with torch.no_grad():
        ctx = drafter.context_kv(hidden[None], torch.arange(length)[None])
        batched = drafter(ids[anchors][None], positions, ctx, block_mask(anchors, length, s))[0]
    for m, a in enumerate(anchors.tolist()):
        runtime = JetSpecDrafter(drafter)
        runtime.begin([ids[:a].tolist()], [hidden[:a]])
        expected = runtime.depth_logprobs(0, int(ids[a]))
        torch.testing.assert_close(batched[m].log_softmax(-1), expected, atol=1e-5, rtol=1e-5)


def test_incremental_context_equals_full_context():
    target, drafter = tiny_drafter()
    hidden = torch.randn(12, 2 * target.config.hidden_size)
    a, b = JetSpecDrafter(drafter), JetSpecDrafter(drafter)
    a.begin([[1] * 12], [hidden])
    b.begin([[1] * 7], [hidden[:7]])
    b.advance([[1] * 5], [hidden[7:]])
    torch.testing.assert_close(a.depth_logprobs(0, 5), b.depth_logprobs(0, 5))


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        DrafterConfig(64, VOCAB, (0,), 3, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="block_size"):
        DrafterConfig(64, VOCAB, (0,), 3, block_size=0)


def test_revealed_tokens_condition_only_later_block_positions():
    target, drafter = tiny_drafter(block=5)
    drafter.eval()
    hidden = torch.randn(10, 2 * target.config.hidden_size)
    runtime = JetSpecDrafter(drafter)
    runtime.begin([[1] * 10], [hidden])
    plain = runtime._block_logprobs(0, 7, [None])
    given = runtime._block_logprobs(0, 7, [None, 11, 12])  # three blocks in one forward
    torch.testing.assert_close(given[0], plain[0])  # an all-MASK block is unchanged by its neighbours
    torch.testing.assert_close(given[1, 0], plain[0, 0])  # depth 1 does not see the revealed depth-1 token
    assert not torch.allclose(given[1, 1:], plain[0, 1:])  # later depths do
    assert not torch.allclose(given[1, 1:], given[2, 1:])
    # revealing through the batched block equals spelling the path out as a teacher-forced block
    s = drafter.cfg.block_size
    revealed = torch.tensor([[[11, -1, -1, -1]]])
    with torch.no_grad():
        ctx = drafter.context_kv(hidden[None], torch.arange(10)[None])
        direct = drafter(torch.tensor([[7]]), torch.arange(10, 10 + s)[None], ctx,
                         block_mask(torch.tensor([10]), 10, s), revealed)[0, 0].log_softmax(-1)
    torch.testing.assert_close(direct, given[1])
