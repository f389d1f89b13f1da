"""Where the project keeps what it makes: converted models, compiled artifacts, caches."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The cache folder: ``$JETSPEC_CACHE``, else ``~/.cache/jetspec_compile``."""
    return Path(os.environ.get("JETSPEC_CACHE", Path.home() / ".cache" / "jetspec_compile"))
