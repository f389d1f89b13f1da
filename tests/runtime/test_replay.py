"""Replay gives the speculative loop's acceptance histogram from the reference output alone."""

import functools

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.drafter import DrafterConfig, JetSpecDrafter, ParallelDrafter
from jetspec_compile.runtime.replay import greedy_reference, reference_taps, replay_acceptance
from tests.drafters import OracleDrafter
from tests.families import VOCAB, make_model

NEW = 40


@pytest.mark.parametrize("budget", [1, 6, 12])
@pytest.mark.parametrize("stop", ["length", "eos"])
def test_replay_histogram_equals_the_loop_with_a_mixed_drafter(budget, stop):
    target = make_model("llama")
    prompt = torch.randint(3, VOCAB, (13,), generator=torch.Generator().manual_seed(budget)).tolist()
    reference = greedy_reference(target, prompt, NEW + budget - 1)
    full = target.generate(torch.tensor([prompt]), max_new_tokens=NEW + budget, do_sample=False,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0].tolist()
    n = min(len(full) - len(prompt), len(reference))
    assert full[len(prompt):len(prompt) + n] == reference[:n]  # HF greedy (which may stop at an EOS)
    eos = [reference[NEW // 2]] if stop == "eos" else []

    def oracle():  # same seed: the same random trees for the same calls
        return OracleDrafter([prompt + reference], VOCAB, "mixed", seed=3, depth=8)

    spec = js.optimize(target, drafter=oracle(), budget=budget, max_cache_len=128, fallback=False)
    x = torch.tensor([prompt])
    out = spec.generate(x, max_new_tokens=NEW, eos_token_id=eos)
    expected = dict(spec.last_stats["acceptance_histogram"])
    got = replay_acceptance(spec.verifier(1), oracle(), prompt, reference, budget=budget, max_new_tokens=NEW,
                            eos_token_ids=eos)
    assert dict(sorted(got.items())) == expected
    emitted = out.shape[1] - len(prompt)
    assert 1 + sum(k * v for k, v in got.items()) >= emitted  # 1: from prefill; the last path may run past
    if budget > 1:
        assert max(expected) > 1, "the mixed drafter should get some drafts accepted"


def test_replay_feeds_the_drafter_the_taps_the_loop_gives_it():
    target = make_model("qwen3")
    cfg = DrafterConfig.for_target(target.config, (0, 2), num_layers=1, block_size=5)
    net = ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings())
    seen = {"loop": [], "replay": []}

    class Spy(JetSpecDrafter):
        def __init__(self, key):
            super().__init__(net, lookup_nodes=0)
            self.key = key

        def begin(self, prompts, hidden):
            seen[self.key].append((list(prompts[0]), hidden[0].clone()))
            super().begin(prompts, hidden)

        def advance(self, accepted, hidden):
            seen[self.key].append((list(accepted[0]), hidden[0].clone()))
            super().advance(accepted, hidden)

    prompt = torch.randint(3, VOCAB, (11,), generator=torch.Generator().manual_seed(5)).tolist()
    spec = js.optimize(target, drafter=Spy("loop"), budget=8, max_cache_len=128, fallback=False)
    spec.generate(torch.tensor([prompt]), max_new_tokens=NEW, eos_token_id=[])
    reference = greedy_reference(target, prompt, NEW + 7)
    got = replay_acceptance(spec.verifier(1), Spy("replay"), prompt, reference, budget=8, max_new_tokens=NEW)
    assert dict(sorted(got.items())) == dict(spec.last_stats["acceptance_histogram"])
    assert len(seen["loop"]) == len(seen["replay"]) > 2
    for (tokens_a, hidden_a), (tokens_b, hidden_b) in zip(seen["loop"], seen["replay"]):
        assert tokens_a == tokens_b
        torch.testing.assert_close(hidden_a, hidden_b, atol=1e-4, rtol=1e-4)


def test_replay_refuses_a_short_reference_or_one_that_does_not_fit():
    target = make_model("llama")
    prompt = [5, 6, 7, 8]
    spec = js.optimize(target, drafter=OracleDrafter([prompt * 40], VOCAB, "right"), budget=6, max_cache_len=64,
                       fallback=False)
    with pytest.raises(ValueError, match=r"needs 25 .*greedy_reference"):
        replay_acceptance(spec.verifier(1), spec.drafter, prompt, [9] * 10, budget=6, max_new_tokens=20)
    with pytest.raises(ValueError, match="max_cache_len=64"):
        replay_acceptance(spec.verifier(1), spec.drafter, prompt, [9] * 80, budget=6, max_new_tokens=70)


def test_replay_with_taps_given_equals_replay_that_prefills_and_checks_their_shape():
    target = make_model("qwen3")
    cfg = DrafterConfig.for_target(target.config, (0, 2), num_layers=1, block_size=5)
    net = ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings())
    spec = js.optimize(target, drafter=JetSpecDrafter(net), budget=8, max_cache_len=128, fallback=False)
    prompt = [4, 9, 4, 9, 4, 9, 4]
    reference = greedy_reference(target, prompt, NEW + 7)
    verifier = spec.verifier(1)
    taps = reference_taps(verifier, prompt, reference)
    assert taps.shape[:2] == (1, len(prompt) + len(reference) - 1)
    run = functools.partial(replay_acceptance, verifier, budget=8, max_new_tokens=NEW)
    assert run(JetSpecDrafter(net), prompt, reference, hidden=taps) == run(JetSpecDrafter(net), prompt, reference)
    with pytest.raises(ValueError, match="taps of prompt"):
        run(JetSpecDrafter(net), prompt, reference, hidden=taps[:, 1:])
