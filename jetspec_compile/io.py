"""Writing files so that a crash never leaves one that looks complete, and naming a model's weights.

Every file or folder the project writes (drafter checkpoints, corpora, feature caches, converted models, ONNX /
AOTInductor / TensorRT artifacts, training state) goes through :func:`atomic_file` or :func:`atomic_folder`:
written under a temporary name beside its destination and renamed into place only when complete.
:func:`model_fingerprint` names a model's config and weights, so caches keyed by it are never reused for another
model or for weights changed since.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["atomic_file", "atomic_folder", "file_lock", "model_fingerprint"]


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = 0o644, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (ending in ``suffix``, for writers that insist on an extension);
    when the block ends without error, rename it to ``path``.

    On an error the temporary file is removed and ``path`` is left as it was (absent or the old file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # mkstemp's file is private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block ends without error, it replaces ``path``.

    An existing ``path`` is swapped out only after the new folder is complete; on an error the temporary folder
    is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        for item in [tmp, *tmp.rglob("*")]:  # mkdtemp's folder is private
            item.chmod(0o755 if item.is_dir() else 0o644)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block: processes that would
    write the same cache entry (two test workers converting one checkpoint) take turns. Where ``fcntl`` is
    missing (Windows) the block runs unlocked; the atomic renames still keep every entry whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def model_fingerprint(model: torch.nn.Module, config_text: str | None = None) -> str:
    """A hash of ``model``'s config (or ``config_text``) and weights: per tensor its name, shape, dtype, sum and
    64 sampled values. Cheap (one pass over the weights) and changes with any realistic weight update."""
    if config_text is None:
        config = model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        config_text = config.to_json_string(use_diff=False)
    h = hashlib.sha256(config_text.encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            flat = t.detach().reshape(-1)
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(repr(float(flat.double().sum())).encode())
            h.update(flat[:: max(1, flat.numel() // 64)][:64].double().cpu().numpy().tobytes())
    return h.hexdigest()
