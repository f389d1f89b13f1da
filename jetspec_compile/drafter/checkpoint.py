"""Save and load drafters: ``drafter.safetensors`` (bf16) + ``config.json`` in one folder, written atomically,
with an optional ``corpus.safetensors`` (:mod:`~jetspec_compile.drafter.corpus`: the target's own responses)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..capture import text_config
from ..io import atomic_folder
from .corpus import CORPUS_FILE, CorpusIndex
from .model import DrafterConfig, ParallelDrafter, vocab_problem

__all__ = ["save_drafter", "load_drafter", "load_corpus", "check_drafter_fits"]

WEIGHTS, CONFIG = "drafter.safetensors", "config.json"


def save_drafter(drafter: ParallelDrafter, path: str | Path, dtype: torch.dtype = torch.bfloat16,
                 corpus: CorpusIndex | None = None) -> Path:
    """Write the drafter's own weights (not the shared embedding / head) and config to folder ``path``.

    ``corpus`` is written beside them; without one, a corpus already in ``path`` is kept (re-saving a drafter,
    e.g. with another draft vocabulary, does not drop it). Everything is written to a temporary folder beside
    ``path`` first and renamed into place, so a crash never leaves a half-written checkpoint that looks complete.
    """
    path = Path(path)
    with atomic_folder(path) as tmp:
        state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
                 for k, v in drafter.state_dict().items()}  # token ids (draft_vocab) stay integers
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "jetspec-drafter"})
        (tmp / CONFIG).write_text(drafter.cfg.to_json())
        if corpus is not None:
            corpus.save(tmp / CORPUS_FILE)
        elif (path / CORPUS_FILE).exists():
            shutil.copyfile(path / CORPUS_FILE, tmp / CORPUS_FILE)
    return path


def check_drafter_fits(cfg: DrafterConfig, target) -> None:
    """Raise ValueError if a drafter built for ``cfg`` cannot drive ``target``."""
    tc = text_config(target)
    problems = []
    if cfg.target_hidden_size != tc.hidden_size:
        problems.append(f"hidden size {cfg.target_hidden_size} != target's {tc.hidden_size}")
    if cfg.vocab_size != tc.vocab_size:
        problems.append(f"vocabulary {cfg.vocab_size} != target's {tc.vocab_size}")
    if cfg.target_num_layers != tc.num_hidden_layers:
        problems.append(f"trained for a target with {cfg.target_num_layers} layers, "
                        f"this one has {tc.num_hidden_layers}")
    if max(cfg.tap_layers) >= tc.num_hidden_layers:
        problems.append(f"taps layers {cfg.tap_layers} beyond the target's {tc.num_hidden_layers}")
    if problems:
        name = f" ({cfg.target_name})" if cfg.target_name else ""
        raise ValueError(f"this drafter was trained for another target{name}: " + "; ".join(problems)
                         + ". Train one for this model with `jetspec-compile train-drafter`.")


def load_drafter(path: str | Path, target, dtype: torch.dtype = torch.float32) -> ParallelDrafter:
    """Load a drafter saved by :func:`save_drafter`, or a DFlash checkpoint folder (vLLM's native or the
    ``speculators`` layout, :mod:`~jetspec_compile.drafter.dflash_format`), and attach it to ``target``'s
    embedding and LM head."""
    from .dflash_format import dflash_layout, load_dflash_drafter

    path = Path(path)
    if dflash_layout(path) is not None:
        return load_dflash_drafter(path, target, dtype)
    if not (path / CONFIG).exists() or not (path / WEIGHTS).exists():
        raise FileNotFoundError(f"{path} is not a drafter checkpoint (needs {CONFIG} and {WEIGHTS})")
    try:
        cfg = DrafterConfig.from_json((path / CONFIG).read_text())
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path / CONFIG} is not a valid drafter config: {err}") from err
    check_drafter_fits(cfg, target)
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path / WEIGHTS} is corrupt or truncated ({err}); re-download or re-train it") from err
    drafter = ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings())
    expected = drafter.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    bad_shapes = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(f"{path / WEIGHTS} does not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}, wrong shapes {sorted(bad_shapes)[:5]}")
    drafter.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    problem = None if drafter.draft_vocab is None else vocab_problem(drafter.draft_vocab, cfg.vocab_size)
    if problem:
        raise ValueError(f"{path / WEIGHTS} has a corrupt draft vocabulary ({problem}); re-create it with "
                         "`jetspec-compile draft-vocab`")
    return drafter.to(dtype).eval()


def load_corpus(path: str | Path, target) -> CorpusIndex | None:
    """The corpus saved with the drafter in folder ``path`` (checked against ``target``'s vocabulary), or None
    if the folder has none."""
    file = Path(path) / CORPUS_FILE
    if not file.exists():
        return None
    return CorpusIndex.load(file, vocab_size=text_config(target).vocab_size)
