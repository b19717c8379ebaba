"""Shared CLI plumbing: config location and user-facing errors."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

_here = Path(__file__).resolve()
# configs/ lives at the repository root in a checkout and inside the package when installed from a wheel
CONFIG_DIR = str(
    next(
        (p for p in (_here.parents[2] / "configs", _here.parents[1] / "configs") if p.is_dir()),
        _here.parents[2] / "configs",
    )
)

log = logging.getLogger("diffdistill")


@contextlib.contextmanager
def friendly_errors():
    """Turn expected user errors (missing files, bad values) into one clear message and exit code 2."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"diffdistill: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
