"""Model folders: ``config.json`` (a ``_target_`` config that rebuilds the module alone), ``model.safetensors``
(its weights) and ``diffdistill.json`` (metadata: role, objective, step, EMA decay, sampling recipe).

Every role (teacher, generator, fake score) is saved and loaded the same way; a training checkpoint is a folder
of such model folders plus the trainer's state (``diffdistill/training/checkpoint.py``). :func:`model_config`
asks a module to describe itself (its ``to_config()``), including every change made to it after it was built
(LoRA adapters, a boundary condition, a guidance embedding), so loading needs no dataset, teacher or objective.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME, WEIGHTS_NAME, META_NAME = "config.json", "model.safetensors", "diffdistill.json"


def _plain(value: Any) -> Any:
    """JSON-ready copy: OmegaConf containers, tuples and numpy/torch scalars become plain Python values."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def model_config(module: nn.Module) -> dict[str, Any]:
    """The ``_target_`` config that rebuilds ``module`` (architecture and hyperparameters, not weights).

    Modules describe themselves with ``to_config()``; LoRA adapters injected by
    :func:`~diffdistill.models.lora.add_lora` are recorded around that description.
    """
    to_config = getattr(module, "to_config", None)
    if to_config is None:
        raise ValueError(
            f"{type(module).__name__} cannot be saved as a model folder: give it a to_config() method that returns "
            "the _target_ config rebuilding it"
        )
    config = _plain(to_config())
    lora = getattr(module, "lora_spec", None)
    if lora:
        config = {"_target_": "diffdistill.models.lora.with_lora", "module": config, **lora}
    return config


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """Instantiate ``{"_target_": "module.fn", **kwargs}`` (Hydra's convention) without Hydra state."""
    from hydra.utils import instantiate

    if "_target_" not in config:
        raise ValueError(f"model config has no '_target_': {sorted(config)}")
    return instantiate(config, _convert_="all")


def save_model(
    model: nn.Module, config: dict[str, Any], folder: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``diffdistill.json`` with ``extra``) into ``folder``
    atomically (temp dir, then rename). ``config=None`` writes weights only (a role restored in place)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp"))
    write_model_files(model, config, tmp, extra)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            import shutil

            shutil.rmtree(old)
        os.replace(folder, old)
        os.replace(tmp, folder)
        import shutil

        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    return folder


def write_model_files(
    model: nn.Module, config: dict[str, Any] | None, folder: Path, extra: dict[str, Any] | None = None
) -> None:
    """The files of a model folder, written into an existing (temporary) folder."""
    # clone: tensors that share storage (tied or shared weights) cannot be written as views by safetensors
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))
    if config is not None:
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    if extra:
        (folder / META_NAME).write_text(json.dumps(extra, indent=2, default=str))


def load_weights(folder: str | Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """``model.safetensors`` of a model folder, with an actionable error when it is missing or corrupt."""
    w_path = Path(folder) / WEIGHTS_NAME
    if not w_path.exists():
        raise FileNotFoundError(f"'{folder}' holds no {WEIGHTS_NAME}")
    try:
        return load_file(str(w_path), device=map_location)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{w_path} is corrupt or not a safetensors file: {e}") from e


def load_model(folder: str | Path, map_location: str = "cpu") -> nn.Module:
    """Build the model recorded in ``folder/config.json`` and load ``model.safetensors`` strictly."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder '{folder}' does not exist")
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.exists() or not w_path.exists():
        raise FileNotFoundError(f"'{folder}' must contain {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    config.pop("_extra", None)  # metadata of folders written before diffdistill.json existed
    try:
        model = build_from_config(config)
    except Exception as e:  # noqa: BLE001 - hydra wraps the builder's error
        raise ValueError(f"{cfg_path} does not build a model: {getattr(e, '__cause__', None) or e}") from e
    state = load_weights(folder, map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{w_path} does not match {cfg_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def model_extra(folder: str | Path) -> dict[str, Any]:
    """The metadata of a model folder (``diffdistill.json``; older folders kept it in ``config.json``)."""
    folder = Path(folder)
    if (folder / META_NAME).exists():
        return json.loads((folder / META_NAME).read_text())
    return json.loads((folder / CONFIG_NAME).read_text()).get("_extra", {})


@torch.no_grad()
def copy_params(dst: nn.Module, src: nn.Module) -> None:
    for pd, ps in zip(dst.parameters(), src.parameters()):
        pd.copy_(ps)


# ---------------------------------------------------------------------------------------------
# checkpoints: a folder of model folders (one per role and EMA track) + the trainer's state

TRAINER_STATE, RUN_CONFIG, MANIFEST, LATEST = "trainer_state.pt", "run_config.json", "manifest.json", "LATEST"
CHECKPOINTS = "checkpoints"


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).exists() and (path / WEIGHTS_NAME).exists()


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / TRAINER_STATE).exists()


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint ``folder/LATEST`` names (``folder`` = a run's ``checkpoints/``), else the newest step folder."""
    named = folder / LATEST
    if named.exists():
        p = folder / named.read_text().strip()
        if is_checkpoint(p):
            return p
    steps = sorted(p for p in folder.glob("step*") if is_checkpoint(p))
    return steps[-1] if steps else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, ``.../checkpoints/last``, a ``checkpoints/`` folder or a run."""
    p = Path(path)
    if is_checkpoint(p):
        return p
    if p.name == "last":
        p = p.parent
    for folder in (p / CHECKPOINTS, p):
        if folder.is_dir():
            found = latest_checkpoint(folder)
            if found is not None:
                return found
    if p.is_file() and p.suffix in (".pt", ".pth", ".ckpt"):
        raise ValueError(
            f"'{path}' is a single-file checkpoint of another format (diffdistill < 0.2 wrote pickles); this version "
            "reads checkpoint folders (model folders + trainer_state.pt): retrain, or load it with that version and "
            "save the generator with diffdistill.models.io.save_model"
        )
    if not p.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    raise ValueError(f"'{path}' is neither a checkpoint folder, a run folder with checkpoints, nor a model folder")


def ema_folders(checkpoint: Path) -> dict[float, Path]:
    """The EMA-track model folders of a checkpoint, by decay."""
    return {float(p.name[4:]): p for p in checkpoint.glob("ema_*") if is_model_folder(p)}


def generator_folder(path: str | Path, ema: str | float | None = "auto") -> Path:
    """The model folder of the generator at ``path`` (a model folder, checkpoint or run folder).

    ``ema``: ``"auto"`` (the highest-decay EMA track, else the online weights), a decay, or ``None`` (online).
    """
    p = Path(path)
    if is_model_folder(p):
        return p
    ckpt = resolve_checkpoint(p)
    tracks = ema_folders(ckpt)
    if ema is None or (ema == "auto" and not tracks):
        return ckpt / "generator"
    if ema == "auto":
        return tracks[max(tracks)]
    if float(ema) not in tracks:
        raise ValueError(f"checkpoint '{ckpt}' has EMA tracks {sorted(tracks)}, not {ema} (ema=null: online weights)")
    return tracks[float(ema)]


def load_generator(path: str | Path, ema: str | float | None = "auto", map_location: str = "cpu") -> nn.Module:
    """A trained student, alone: from its model folder, a checkpoint folder or a run folder.

    Needs no dataset, teacher, objective or loss network: the folder's ``config.json`` records the student's
    architecture and every change an objective made to it.

    Args:
        path: a generator model folder, a checkpoint folder (``checkpoints/step*``, ``checkpoints/last``) or a run.
        ema: ``"auto"`` (the highest-decay EMA track), a decay value, or ``None`` (the online weights).
    """
    folder = generator_folder(path, ema)
    model = load_model(folder, map_location)
    from diffdistill.models.generator import Generator

    if not isinstance(model, Generator):
        raise ValueError(f"'{folder}' holds a {type(model).__name__}, not a generator")
    return model.eval()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def local_or_hub(path: str | Path) -> str:
    """``path`` if it exists here; else a hub id (``org/name``) to hand to ``from_pretrained``; a path that looks
    local (absolute, relative with ``./``, ``~``, several folders, or whose first folder exists here) and is missing
    is a clear "not found", never a network request."""
    text = str(path)
    local = Path(text).expanduser()
    if local.exists():
        return str(local)
    first = text.split("/", 1)[0]
    if not _HUB_ID.match(text) or text.startswith(("~", ".")) or (first != text and Path(first).is_dir()):
        raise FileNotFoundError(f"'{text}' does not exist (it is a local path, so no hub download was tried)")
    return text
