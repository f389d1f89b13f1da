"""Self-distillation data: greedy and sampled regeneration, resumable, deterministic for a seed."""

from __future__ import annotations

import json

import pytest
import torch

from jetspec_compile.training.data import read_sequences, regenerate
from tests.families import VOCAB, make_model


class CharTokenizer:
    """No chat template: ``encode_chat`` falls back to plain encoding; one id per character."""

    chat_template = None
    eos_token_id = 2
    pad_token_id = 0

    def __call__(self, text: str) -> dict:
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}


PROMPTS = [("toy", "def add(a, b):"), ("toy", "x = [1, 2, 3]"), ("toy", "# sort a list\n")]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return make_model("llama")


def test_greedy_regeneration_is_the_targets_greedy_output_and_resumes(model, tmp_path):
    out = tmp_path / "data.jsonl"
    regenerate(model, CharTokenizer(), PROMPTS, out, max_new_tokens=6, batch_size=2)
    records = read_sequences(out)
    assert len(records) == len(PROMPTS) and all("sample" not in r for r in records)
    for rec in records:  # batched left-padded generation matches the target's own greedy decoding of one prompt
        ids = torch.tensor([rec["prompt_ids"]])
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        if 2 in ref:
            ref = ref[:ref.index(2) + 1]
        assert rec["response_ids"] == ref
    size = out.stat().st_size
    regenerate(model, CharTokenizer(), PROMPTS, out, max_new_tokens=6, batch_size=2)
    assert out.stat().st_size == size, "a second run over the same prompts must append nothing"


def test_sampled_regeneration_draws_several_responses_per_prompt(model, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (a, b):
        regenerate(model, CharTokenizer(), PROMPTS, path, max_new_tokens=8, batch_size=4, samples=3,
                   temperature=1.0, seed=5)
    records = read_sequences(a)
    assert sorted((r["prompt_ids"][0], r["sample"]) for r in records) == sorted(
        (CharTokenizer()(p)["input_ids"][0], k) for _, p in PROMPTS for k in range(3))
    assert a.read_text() == b.read_text(), "sampling must be deterministic for a seed"
    per_prompt = {}
    for r in records:
        per_prompt.setdefault(tuple(r["prompt_ids"]), set()).add(tuple(r["response_ids"]))
    assert any(len(v) > 1 for v in per_prompt.values()), "samples of one prompt should differ"
    regenerate(model, CharTokenizer(), PROMPTS, a, max_new_tokens=8, batch_size=4, samples=4, temperature=1.0)
    assert len(read_sequences(a)) == 4 * len(PROMPTS), "a resumed run adds only the missing sample index"
    # greedy records of the same prompts are not mistaken for samples, nor the other way round
    regenerate(model, CharTokenizer(), PROMPTS, a, max_new_tokens=8, batch_size=4)
    assert sum("sample" not in json.loads(line) for line in a.read_text().splitlines()) == len(PROMPTS)


@pytest.mark.parametrize("samples, temperature", [(-1, 0.7), (2, 0.0)])
def test_bad_sampling_options_are_refused(model, tmp_path, samples, temperature):
    with pytest.raises(ValueError, match="samples must be"):
        regenerate(model, CharTokenizer(), PROMPTS, tmp_path / "x.jsonl", samples=samples, temperature=temperature)
    assert not (tmp_path / "x.jsonl").exists()
