"""Self-distillation data: greedy and sampled regeneration, resumable, deterministic for a seed; by HF ``generate``
or by a vLLM peer (a stand-in vllm package here, see ``tests/fake_vllm.py``)."""

from __future__ import annotations

import json

import pytest
import torch

from jetspec_compile.peers import PeerConfig, VLLMPeer
from jetspec_compile.training.data import read_sequences, regenerate
from jetspec_compile.training.recipe import Recipe, response_engine
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


def _fake_answer(prompt_ids, max_new_tokens, seed=None, eos=2):
    """What the stand-in vLLM generates: counting up from the last prompt token (by 2 from it plus the seed when
    sampling), mod 50, stopping after EOS."""
    ids, t = [], prompt_ids[-1] + (seed or 0)
    while len(ids) < max_new_tokens:
        t = (t + (1 if seed is None else 2)) % 50
        ids.append(t)
        if t == eos:
            break
    return ids


def test_regeneration_by_a_vllm_peer_writes_its_answers_and_resumes(fake_python, tmp_path):
    out = tmp_path / "data.jsonl"
    with VLLMPeer(PeerConfig(model="m", threads=1, preload=False), python=fake_python) as peer:
        regenerate(None, CharTokenizer(), PROMPTS, out, max_new_tokens=60, batch_size=2, engine=peer)
        records = read_sequences(out)
        assert len(records) == len(PROMPTS) and all("sample" not in r for r in records)
        for rec in records:  # its tokens as answered, cut after EOS (the fake always reaches it within 60)
            assert rec["response_ids"] == _fake_answer(rec["prompt_ids"], 60) and rec["response_ids"][-1] == 2
        size = out.stat().st_size
        regenerate(None, CharTokenizer(), PROMPTS, out, max_new_tokens=60, batch_size=2, engine=peer)
        assert out.stat().st_size == size, "a second run over the same prompts must append nothing"
        regenerate(None, CharTokenizer(), PROMPTS, out, max_new_tokens=5, batch_size=6, samples=2, seed=3,
                   engine=peer)
    sampled = [r for r in read_sequences(out) if "sample" in r]
    assert sorted(r["sample"] for r in sampled) == [0, 0, 0, 1, 1, 1]
    for rec in sampled:  # one seed per sample index: the two draws of a prompt differ
        assert rec["response_ids"] == _fake_answer(rec["prompt_ids"], 5, seed=3 * 1_000_003 + 7919 * rec["sample"])
    by_prompt = {}
    for rec in sampled:
        by_prompt.setdefault(tuple(rec["prompt_ids"]), set()).add(tuple(rec["response_ids"]))
    assert all(len(v) == 2 for v in by_prompt.values())


def test_recipe_refuses_an_unknown_generator():
    with pytest.raises(ValueError, match="generator must be one of"):
        Recipe(generator="llamacpp")
    with pytest.raises(ValueError, match="gen_batch must be >= 1"):
        Recipe(gen_batch=0)


def test_vllm_generator_serves_the_models_folder_with_room_for_every_request(model, fake_python, tmp_path,
                                                                            monkeypatch):
    recipe = Recipe(generator="vllm", gen_batch=8)
    with pytest.raises(ValueError, match="not loaded from one"):
        with response_engine(model, recipe, max_tokens=512, python=fake_python):
            pass
    with response_engine(model, Recipe(), max_tokens=512) as engine:
        assert engine is None  # "hf": the model itself generates
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    model.name_or_path = str(folder)
    record = tmp_path / "engine.json"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    with response_engine(model, recipe, max_tokens=512, python=fake_python):
        pass  # nothing to regenerate: no engine is started
    assert not record.exists()
    with response_engine(model, recipe, max_tokens=512, python=fake_python) as engine:
        assert engine.generate([[5, 6]], 3).outputs == [[7, 8, 9]]
    built = json.loads(record.read_text())
    assert built["model"] == str(folder) and built["dtype"] == "float32" and built["max_num_seqs"] == 8
    assert built["max_model_len"] == 512 and built["threads_bind"] == f"0-{torch.get_num_threads() - 1}"
    c = model.config
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert int(built["kv_cache_gib"]) * 2**30 >= kv_bytes * 512 * 8
    assert engine.peer._proc.poll() is not None, "the engine must be closed on leaving the block"
