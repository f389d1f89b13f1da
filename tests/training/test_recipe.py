"""``train-drafter``'s recipe end to end, and fine-tuning a trained drafter on new data (``--init-from``): the
drafter keeps its shape and draft vocabulary, and the corpus keeps what it had and gains the new responses."""

from __future__ import annotations

import json

import pytest
import torch

from jetspec_compile.drafter import load_corpus, load_drafter
from jetspec_compile.training.recipe import Recipe, held_out_split, train_from_prompts
from jetspec_compile.training.train import TrainConfig
from tests.families import VOCAB, make_model
from tests.training.test_data import CharTokenizer

SMALL = TrainConfig(epochs=1, lr=1e-3, anchors_per_sequence=4, sequences_per_step=4, checkpoint_every=1000)


def prompt_file(path, texts):
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A drafter trained from scratch by the recipe, with a draft vocabulary and a corpus."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    target = make_model("llama")
    root = tmp_path_factory.mktemp("recipe")
    prompts = prompt_file(root / "a.jsonl", [f"def f{i}(x):" for i in range(10)])
    recipe = Recipe(prompts=(prompts,), response_tokens=8, gen_batch=5, layers=1, block_size=4, tap_layers=(0, 2),
                    train=SMALL, use_feature_cache=False, draft_vocab=VOCAB // 2)
    drafter, corpus = train_from_prompts(target, CharTokenizer(), recipe, root / "a", data_path=root / "a_data.jsonl",
                                         progress=False)
    return target, root, recipe, drafter, corpus


def test_fine_tuning_keeps_the_shape_and_vocabulary_and_merges_the_corpus(first):
    target, root, recipe, start, start_corpus = first
    assert start.draft_vocab is not None and start.cfg.style == "dflash"
    prompts = prompt_file(root / "b.jsonl", [f"while y{i} < 3:" for i in range(10)] + ["def f0(x):"])
    again = recipe.replace(prompts=(prompts,), init_from=str(root / "a" / "drafter"), draft_vocab=7,
                           mask_token_id=None)
    drafter, corpus = train_from_prompts(target, CharTokenizer(), again, root / "b", data_path=root / "b_data.jsonl",
                                         progress=False)
    assert drafter.cfg == start.cfg, "a fine-tuned drafter has its checkpoint's shape (taps, block, mask token)"
    assert drafter.draft_vocab.tolist() == start.draft_vocab.tolist(), "and drafts over the same vocabulary"
    assert any(not torch.equal(a, b) for a, b in zip(drafter.state_dict().values(), start.state_dict().values()))
    old = [tuple(s.tolist()) for s in start_corpus.sequences()]
    new = [tuple(s.tolist()) for s in corpus.sequences()]
    assert new[:len(old)] == old, "the checkpoint's corpus comes first, unchanged"
    assert len(new) > len(old) and len(set(new)) == len(new), "then the new responses, none twice"
    saved = load_corpus(root / "b" / "drafter", target)
    assert [tuple(s.tolist()) for s in saved.sequences()] == new
    assert load_drafter(root / "b" / "drafter", target).draft_vocab.tolist() == start.draft_vocab.tolist()
    # --new-vocab --replace-corpus: a vocabulary and a corpus of the new data only
    fresh, only_new = train_from_prompts(target, CharTokenizer(), again.replace(keep_vocab=False, merge_corpus=False),
                                         root / "c", data_path=root / "b_data.jsonl", progress=False)
    assert fresh.cfg.draft_vocab_size == 7 and len(only_new.sequences()) < len(new)
    # more layers grows the drafter
    grown, _ = train_from_prompts(target, CharTokenizer(), again.replace(layers=2), root / "d",
                                  data_path=root / "b_data.jsonl", progress=False)
    assert grown.cfg.num_layers == 2 and grown.cfg.tap_layers == start.cfg.tap_layers


@pytest.mark.parametrize("change, named", [(dict(block_size=8), "block_size=4"),
                                           (dict(tap_layers=(1, 2)), "tap_layers=(0, 2)"),
                                           (dict(style="jetspec"), "style='dflash'")])
def test_fine_tuning_refuses_another_shape(first, change, named):
    target, root, recipe, start, _ = first
    bad = recipe.replace(init_from=str(root / "a" / "drafter"), **change)
    with pytest.raises(ValueError, match="train from scratch") as err:
        train_from_prompts(target, CharTokenizer(), bad, root / "bad", data_path=root / "bad_data.jsonl",
                           progress=False)
    assert named in str(err.value)
    assert not (root / "bad").exists() and not (root / "bad_data.jsonl").exists(), "refused before any work"


def test_held_out_sequences_are_a_seeded_draw_not_the_head_of_the_data():
    items = list(range(100))  # the data file's order: one set first, as regeneration writes it
    train, held = held_out_split(items, seed=0)
    assert len(held) == 5 and sorted(train + held) == items and not set(train) & set(held)
    assert held != items[:5], "the head of the file is one prompt set; the held-out share must span all"
    assert held_out_split(items, seed=0) == (train, held) and held_out_split(items, seed=1)[1] != held
    assert held_out_split([7, 8], seed=0)[1] in ([7], [8])
