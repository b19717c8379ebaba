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


def compose_config(overrides: list[str] | None = None, config_name: str = "train"):
    """Compose a diffdistill config from Python (notebooks, tests), with the same overrides as the CLI."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))
