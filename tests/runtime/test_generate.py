"""End-to-end losslessness of greedy generation, and the generate() contract."""

import functools

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.drafter import NGramDrafter
from tests.drafters import OracleDrafter
from tests.families import FAMILIES, VOCAB, make_model
from tests.reference import left_pad

NEW = 24




@functools.lru_cache(maxsize=None)
def spec_model(family):
    return js.optimize(make_model(family), budget=12, max_cache_len=128)


def prompts(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 14)[:batch]]


def hf_generate(model, ids, mask, new=NEW):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mode", ["right", "wrong", "mixed", "ngram"])
def test_greedy_is_token_identical_to_hf_generate(family, batch, mode):
    spec = spec_model(family)
    ids, mask = left_pad(prompts(batch, seed=batch))
    expected = hf_generate(spec.model, ids, mask)
    refs = [expected[r][mask[r].bool().tolist() + [True] * (expected.shape[1] - ids.shape[1])].tolist()
            for r in range(batch)]
    spec.drafter = NGramDrafter() if mode == "ngram" else OracleDrafter(refs, VOCAB, mode, seed=batch)
    out = spec.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(out, expected), f"{family} {mode}: {out.tolist()} != {expected.tolist()}"
    stats = spec.last_stats
    assert stats["target_forwards"] == stats["steps"] + 1
    if mode == "right":  # an always-right drafter commits several tokens per forward
        assert stats["tau"] > 2.0
    if mode == "wrong":
        assert stats["tau"] == 1.0


def test_max_new_tokens_is_exact_and_zero_is_allowed():
    spec = spec_model("llama")
    ids, mask = left_pad(prompts(1))
    for new in (0, 1, 5, 17):
        out = spec.generate(ids, max_new_tokens=new, eos_token_id=[])
        assert out.shape[1] == ids.shape[1] + new


def test_stops_on_any_of_several_eos_ids_like_hf():
    spec = spec_model("qwen3")
    ids, mask = left_pad(prompts(2))
    free = hf_generate(spec.model, ids, mask, new=20)
    # make two tokens that the model really produces end-of-sequence tokens
    eos = [int(free[0, ids.shape[1] + 5]), int(free[1, ids.shape[1] + 3])]
    with torch.no_grad():
        expected = spec.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                       eos_token_id=eos, pad_token_id=0)
    out = spec.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, expected)
    assert out.shape[1] < ids.shape[1] + 20


def test_long_generation_in_a_batch_defragments_the_cache():
    model = make_model("llama")
    model.generation_config.eos_token_id = None  # run the full length in both
    spec = js.optimize(model, budget=8, max_cache_len=96, drafter=NGramDrafter(), fallback=False)
    ids, mask = left_pad(prompts(2))
    expected = hf_generate(model, ids, mask, new=70)
    out = spec.generate(ids, attention_mask=mask, max_new_tokens=70)
    assert torch.equal(out, expected)
    assert spec.last_stats["defragmentations"] >= 1


class _Exploding(NGramDrafter):
    def __init__(self, after):
        super().__init__()
        self.after = after

    def draft(self, roots, budget):
        self.after -= 1
        if self.after < 0:
            raise RuntimeError("drafter failed")
        return super().draft(roots, budget)


def test_drafter_error_leaves_model_usable():
    model = make_model("gpt2")
    # no fallback: the drafter runs on every step (the controller would space out its calls on a losing model)
    spec = js.optimize(model, drafter=_Exploding(after=2), budget=8, max_cache_len=96, fallback=False)
    ids, mask = left_pad(prompts(1))
    with pytest.raises(RuntimeError, match="drafter failed"):
        spec.generate(ids, max_new_tokens=30)
    spec.drafter = NGramDrafter()
    assert torch.equal(spec.generate(ids, max_new_tokens=10), hf_generate(model, ids, mask, new=10))


def test_bad_inputs_raise_clear_errors():
    spec = spec_model("llama")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="exceeds max_cache_len"):
        spec.generate(torch.ones(1, 120, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        spec.generate(ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="non-empty"):
        spec.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        spec.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        spec.generate(ids, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        spec.generate(ids, do_sample=True, top_k=-3)
    with pytest.raises(ValueError, match="vocabulary"):
        spec.generate(torch.tensor([[VOCAB + 3]]))
    with pytest.raises(ValueError, match="left-padded"):
        spec.generate(torch.tensor([[5, 6], [7, 8]]), attention_mask=torch.tensor([[1, 1], [1, 0]]))
    with pytest.raises(ValueError, match="device"):
        spec.generate(ids.to("meta"))
    with pytest.raises(TypeError, match="unsupported arguments"):
        spec.generate(ids, num_beams=4)


def test_float_token_ids_get_a_clear_error_not_a_torch_crash():
    spec = spec_model("llama")
    with pytest.raises(TypeError, match="integer token ids.*long"):
        spec.generate(torch.tensor([[5.0, 6.0, 7.0]]))
    with pytest.raises(TypeError, match="integer tensor"):
        spec.verifier(1).prefill(torch.tensor([[5.0, 6.0]]))


def test_drafter_that_does_not_fit_the_target_is_refused():
    class Wrong(NGramDrafter):
        vocab_size = VOCAB + 1

    with pytest.raises(ValueError, match="vocabulary"):
        js.optimize(make_model("llama"), drafter=Wrong())

    class WrongHidden(NGramDrafter):
        target_hidden_size = 999

    with pytest.raises(ValueError, match="hidden size"):
        js.optimize(make_model("llama"), drafter=WrongHidden())


def test_optimize_options_and_decorator():
    with pytest.raises(TypeError, match="unknown jetspec option.*budgett"):
        js.optimize(make_model("llama"), budgett=4)
    with pytest.raises(ValueError, match="backend"):
        js.optimize(make_model("llama"), backend="tpu")

    @js.optimize(budget=6, max_cache_len=64)
    def build():
        return make_model("llama")

    spec = build()
    assert isinstance(spec, js.SpecModel) and spec.config.budget == 6

    @js.optimize(budget=6, max_cache_len=64)
    class Builder:
        def __new__(cls):
            return make_model("llama")

    assert isinstance(Builder(), js.SpecModel)
    ids, mask = left_pad(prompts(1))
    assert torch.equal(spec.generate(ids, max_new_tokens=8), hf_generate(spec.model, ids, mask, new=8))


def test_streamer_receives_prompt_then_every_new_token():
    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    spec = spec_model("llama")
    ids, _ = left_pad(prompts(1))
    rec = Recorder()
    out = spec.generate(ids, max_new_tokens=15, streamer=rec)
    assert rec.ended and rec.chunks[0] == ids[0].tolist()
    assert sum(rec.chunks[1:], []) == out[0, ids.shape[1]:].tolist()
