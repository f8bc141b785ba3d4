"""Where ESA keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """ESA's own cache (tokenised windows, the built-in tiny model): $ESA_CACHE_DIR or ~/.cache/esa."""
    root = os.environ.get("ESA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "esa")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
