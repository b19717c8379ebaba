"""Shared CLI plumbing: config location and user-facing errors."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys

from diffdistill.utils.paths import CONFIG_DIR as _CONFIG_DIR
from diffdistill.utils.resolvers import register_resolvers

CONFIG_DIR = str(_CONFIG_DIR)
register_resolvers()

log = logging.getLogger("diffdistill")


@contextlib.contextmanager
def friendly_errors():
    """Turn expected user errors (missing files, bad values) into one clear message and exit code 2."""
    from diffdistill.training.checkpoint import CheckpointError

    try:
        yield
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, CheckpointError) as e:
        print(f"diffdistill: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # the disk filled up under the logger or the grid writer, a folder is not writable...
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"diffdistill: error: {why}{where}; the run's checkpoints written so far are intact", file=sys.stderr)
        raise SystemExit(2) from None


def compose_config(overrides: list[str] | None = None, config_name: str = "train"):
    """Compose a diffdistill config from Python (notebooks, tests), with the same overrides as the CLI."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)
    # outside a Hydra run there is no runtime output folder: resolve it the way `hydra.run.dir` says
    with open_dict(cfg):
        if "run_dir" in cfg and str(cfg._get_node("run_dir")._value()).startswith("${hydra:"):
            cfg.run_dir = cfg.hydra.run.dir
        del cfg["hydra"]
    return cfg
