"""Drafters: the protocol, a training-free n-gram tree drafter, and the parallel tree drafter (JetSpec)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import check_drafter_fits, load_corpus, load_drafter, save_drafter
from .corpus import CorpusIndex
from .jetspec import JetSpecDrafter
from .model import DrafterConfig, ParallelDrafter
from .ngram import NGramDrafter
from .protocol import Drafter, DraftTree
from .tree_builder import best_first_tree

__all__ = [
    "CorpusIndex",
    "DraftTree",
    "Drafter",
    "DrafterConfig",
    "JetSpecDrafter",
    "NGramDrafter",
    "ParallelDrafter",
    "best_first_tree",
    "check_drafter_fits",
    "load_corpus",
    "load_drafter",
    "load_jetspec_drafter",
    "save_drafter",
    "shipped_drafter_path",
    "drafter_folder",
]

_SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"


def shipped_drafter_path(name: str = "smollm2") -> Path:
    """Folder of a drafter checkpoint shipped with the package (``smollm2``: SmolLM2-135M-Instruct)."""
    path = _SHIPPED / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no shipped drafter {name!r} in {_SHIPPED}")
    return path


def drafter_folder(path) -> Path:
    """A drafter checkpoint folder: ``path`` itself, or the shipped one for ``"smollm2"`` (unless such a local
    folder exists)."""
    if str(path) == "smollm2" and not Path(path).exists():
        return shipped_drafter_path("smollm2")
    return Path(path)


def load_jetspec_drafter(path, target, width: int = 4, max_depth: int | None = None,
                         path_branches: int = 0, lookup_nodes: int | None = None,
                         corpus: bool = True) -> JetSpecDrafter:
    """Load a drafter checkpoint (a folder, or ``"smollm2"`` for the shipped one) ready for ``optimize``; with
    ``corpus`` (default) the folder's ``corpus.safetensors``, if it has one, is drafted from too."""
    folder = drafter_folder(path)
    return JetSpecDrafter(load_drafter(folder, target), width=width, max_depth=max_depth, path_branches=path_branches,
                          lookup_nodes=lookup_nodes, corpus=load_corpus(folder, target) if corpus else None)
