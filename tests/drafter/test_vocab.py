"""Draft vocabularies: the drafter proposes only frequent tokens, its head is those rows, output stays lossless."""

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.drafter import JetSpecDrafter, load_drafter, save_drafter
from jetspec_compile.drafter.step import DraftStep
from jetspec_compile.drafter.vocab import frequent_tokens
from tests.drafter.test_model import tiny_drafter
from tests.families import VOCAB

SUBSET = [2, 5, 9, 11, 17, 23, 30, 41, 42, 57, 60, 71, 88, 96]


def test_restricted_step_is_the_full_distribution_renormalised_over_the_subset():
    target, drafter = tiny_drafter()
    drafter.eval()
    small = drafter.restrict_vocab(SUBSET)
    assert small.cfg.draft_vocab_size == len(SUBSET) and small.draft_vocab.tolist() == SUBSET
    assert small.draft_vocab.dtype == torch.long
    hidden = torch.randn(10, 2 * target.config.hidden_size)
    full, part = JetSpecDrafter(drafter), JetSpecDrafter(small)
    for d in (full, part):
        d.begin([[1] * 10], [hidden])
    expected = full.depth_logprobs(0, 7)[:, SUBSET].log_softmax(-1)
    torch.testing.assert_close(part.depth_logprobs(0, 7), expected, atol=1e-5, rtol=1e-5)
    # the step carries only the subset's head rows, not the whole head
    step = DraftStep(small)
    assert step.head_weight.shape == (len(SUBSET), target.config.hidden_size)
    assert not hasattr(step, "lm_head")


def test_drafted_tokens_come_from_the_subset_and_generation_stays_lossless():
    target, drafter = tiny_drafter()
    runtime = JetSpecDrafter(drafter.restrict_vocab(SUBSET), width=3, lookup_nodes=0)
    hidden = torch.randn(10, 2 * target.config.hidden_size)
    runtime.begin([[1] * 10], [hidden])
    (tree,) = runtime.draft([7], budget=9)
    assert tree.tokens[0] == 7 and len(tree.tokens) == 9 and set(tree.tokens[1:]) <= set(SUBSET)
    spec = js.attach_drafter(target, JetSpecDrafter(drafter.restrict_vocab(SUBSET), width=3, path_branches=2),
                             budget=8, max_cache_len=128)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    assert torch.equal(spec.generate(ids, max_new_tokens=30), expected)
    assert spec.last_stats["drafter_calls"] > 0


def test_checkpoint_keeps_the_vocabulary_as_integers(tmp_path):
    target, drafter = tiny_drafter()
    small = drafter.restrict_vocab(SUBSET)
    save_drafter(small, tmp_path / "d")
    loaded = load_drafter(tmp_path / "d", target)
    assert loaded.cfg.draft_vocab_size == len(SUBSET)
    assert loaded.draft_vocab.dtype == torch.long and loaded.draft_vocab.tolist() == SUBSET
    assert drafter.restrict_vocab(None).draft_vocab is None  # back to the whole vocabulary


def test_bad_vocabularies_are_refused(tmp_path):
    target, drafter = tiny_drafter()
    with pytest.raises(ValueError, match="must lie in"):
        drafter.restrict_vocab([3, VOCAB])
    with pytest.raises(ValueError, match="distinct"):
        drafter.restrict_vocab([3, 3])
    path = save_drafter(drafter.restrict_vocab(SUBSET), tmp_path / "d")
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "drafter.safetensors"))
    state["draft_vocab"] = torch.tensor([4] * len(SUBSET))
    save_file(state, str(path / "drafter.safetensors"))
    with pytest.raises(ValueError, match="corrupt draft vocabulary"):
        load_drafter(path, target)


def test_frequent_tokens_counts_responses_then_prompts():
    records = [{"prompt_ids": [50, 51, 51], "response_ids": [7, 7, 8, 9, 9, 9]},
               {"prompt_ids": [52], "response_ids": [8, 2]}]
    assert frequent_tokens(records, 3) == [9, 7, 8]  # by count, ties by id
    assert frequent_tokens(records, 3, always=[2]) == [2, 9, 7]
    assert frequent_tokens(records, 6) == [9, 7, 8, 2, 51, 50]  # topped up from the prompts
    assert len(frequent_tokens(records, 100)) == 7  # no more distinct tokens than the data holds
    with pytest.raises(ValueError, match="at least one"):
        frequent_tokens(records, 0)
    with pytest.raises(ValueError, match="no records"):
        frequent_tokens([], 5)
