"""Where fastssl keeps what it generates once and reuses: the built-in dataset, converted .betons."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$FASTSSL_CACHE, or ~/.cache/fastssl where it is unset or empty."""
    return Path(os.environ.get("FASTSSL_CACHE") or Path.home() / ".cache" / "fastssl")
