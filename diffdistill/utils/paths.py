"""Project paths: the cache (weights, reference statistics), the packaged assets and the Hydra configs."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
ASSETS = PACKAGE / "assets"
# the one config root: package data, so a checkout and a wheel install find it at the same place
CONFIG_DIR = PACKAGE / "configs"


def cache_dir() -> Path:
    """``$DIFFDISTILL_CACHE`` or ``$XDG_CACHE_HOME/diffdistill`` (default ``~/.cache/diffdistill``)."""
    root = os.environ.get("DIFFDISTILL_CACHE")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffdistill")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p
