"""Training checkpoints: one folder per checkpoint, written atomically, verified on load, never unpickled.

Layout of ``<run>/checkpoints/step0000100/``:

* one model folder per role and EMA track (``generator/``, ``ema_0.999/``, ``fake_score/``...; see
  ``diffdistill/models/io.py``): ``config.json`` + ``model.safetensors`` + ``diffdistill.json``;
* ``trainer_state.pt``: optimisers, LR schedulers, EMA counters, objective state, data position, RNG states and the
  step, as tensors and plain Python values only (loaded with ``torch.load(weights_only=True)``: no code runs);
* ``run_config.json``: the resolved run config;
* ``manifest.json``: size and SHA-256 of every file, written last and checked on load.

``checkpoints/LATEST`` names the newest complete checkpoint (written after the folder is in place).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffdistill.models.io import (
    LATEST,
    MANIFEST,
    RUN_CONFIG,
    TRAINER_STATE,
    ema_folders,
    load_weights,
    resolve_checkpoint,
    write_model_files,
)

log = logging.getLogger("diffdistill")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous checkpoints are intact."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file through a temp file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(
    folder: str | Path,
    models: dict[str, tuple[nn.Module, dict[str, Any] | None, dict[str, Any] | None]],
    trainer_state: dict[str, Any],
    run_config: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically: everything goes to a temp folder beside it, is fsynced and listed in
    the manifest, and the folder is renamed into place; then ``LATEST`` is pointed at it.

    Args:
        folder: ``<run>/checkpoints/step0000100``.
        models: ``name -> (module, model config or None, metadata)``, one model folder each.
        trainer_state: tensors and plain values only (checked: it must load with ``weights_only=True``).
        run_config: the resolved run config.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp"))
    try:
        for name, (module, config, extra) in models.items():
            (tmp / name).mkdir()
            write_model_files(module, config, tmp / name, extra)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / RUN_CONFIG).write_text(json.dumps(run_config or {}, indent=2, default=str))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {}
        for p in files:
            _fsync(p)
            manifest[str(p.relative_to(tmp))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for p in tmp.rglob("*"):  # readable by the run folder's other users (mkdtemp makes 0700)
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(tmp, 0o755)
        if folder.exists():  # the same step written again (a resumed run that ends where it started)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        atomic_write_text(folder.parent / LATEST, folder.name + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        raise CheckpointError(
            f"could not write checkpoint '{folder}': {why}; nothing was half-written and earlier checkpoints in "
            f"'{folder.parent}' are intact (free space, or set trainer.keep_checkpoints lower)"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def clean_temporary(folder: Path) -> list[Path]:
    """Remove what an interrupted save left in ``folder`` (a run's ``checkpoints/``): temp folders and files."""
    removed = []
    for p in folder.glob(".*.tmp*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted checkpoint write in %s", len(removed), folder)
    return removed


def newest_valid_checkpoint(folder: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint in ``folder`` that verifies against its manifest, and the newer ones that did not
    (each with the reason), newest first. ``LATEST`` is only a hint: a crash between the rename of a complete
    checkpoint and the update of ``LATEST`` leaves the newer folder valid, and it is taken."""
    rejected: list[tuple[Path, str]] = []
    steps = sorted((p for p in folder.glob("step*") if p.is_dir()), key=lambda p: p.name, reverse=True)
    for p in steps:
        try:
            verify_checkpoint(p)
            if not (p / TRAINER_STATE).exists():
                raise ValueError(f"checkpoint '{p}' has no {TRAINER_STATE}")
            return p, rejected
        except ValueError as e:
            rejected.append((p, str(e)))
    return None, rejected


def verify_checkpoint(folder: Path) -> None:
    """Check every file against the manifest (sizes, then SHA-256); a clear error names the first mismatch."""
    mpath = folder / MANIFEST
    if not mpath.exists():
        raise ValueError(f"checkpoint '{folder}' has no {MANIFEST}: it was not completely written")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint '{folder}': {MANIFEST} is corrupt ({e})") from e
    for rel, entry in manifest.items():
        p = folder / rel
        if not p.exists():
            raise ValueError(f"checkpoint '{folder}' is incomplete: {rel} is missing")
        if p.stat().st_size != entry["size"] or _sha256(p) != entry["sha256"]:
            raise ValueError(f"checkpoint '{folder}' is corrupt: {rel} does not match its checksum")


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder (or the newest one of a run) into one dict, without executing any code from it.

    Returns ``step``, ``roles`` (name -> state dict), ``ema`` (decay -> ``{"module", "num_updates", "decay"}``),
    ``optimizers``, ``schedulers``, ``objective_state``, ``data``, ``rng``, ``nonfinite``, ``config`` and ``path``.
    """
    folder = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(folder)
    try:
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt or foreign files
        raise ValueError(
            f"checkpoint '{folder}': {TRAINER_STATE} cannot be read safely ({type(e).__name__}: {e}); "
            "resume from an earlier checkpoint in the same folder"
        ) from e
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"'{folder}' is not a diffdistill checkpoint (no 'step' in {TRAINER_STATE})")
    tracks = ema_folders(folder)
    state["roles"] = {
        p.name: load_weights(p) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith("ema_")
    }
    state["ema"] = {
        str(d): {**state.get("ema_meta", {}).get(str(d), {}), "module": load_weights(p)} for d, p in tracks.items()
    }
    state["config"] = json.loads((folder / RUN_CONFIG).read_text()) if (folder / RUN_CONFIG).exists() else None
    state["path"] = str(folder)
    return state


def load_role_weights(path: str | Path, verify: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """The role model folders of a checkpoint (or of a run's newest one) as ``role -> state dict``, without the
    trainer state or EMA tracks: what a weights-only init (``trainer.init_from``) reads. Verified against the
    manifest first."""
    folder = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(folder)
    roles = {p.name: load_weights(p) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith("ema_")}
    if not roles:
        raise ValueError(f"checkpoint '{folder}' holds no role model folders (generator/, fake_score/, ...)")
    return roles


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (safe to load with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
