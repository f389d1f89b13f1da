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
