"""Project paths: the cache (weights, reference statistics) and the packaged assets."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def cache_dir() -> Path:
    """``$DIFFDISTILL_CACHE`` or ``$XDG_CACHE_HOME/diffdistill`` (default ``~/.cache/diffdistill``)."""
    root = os.environ.get("DIFFDISTILL_CACHE")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffdistill")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p
