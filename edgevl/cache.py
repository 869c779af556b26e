"""Where edgevl keeps what it builds once: engines, inlined graphs, benchmark presets."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$EDGEVL_CACHE, else ~/.cache/edgevl."""
    return Path(os.environ.get("EDGEVL_CACHE") or Path.home() / ".cache" / "edgevl")
