"""Save and load denoisers as a folder: ``config.json`` (how to build it) + ``model.safetensors``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """Instantiate ``{"_target_": "module.fn", **kwargs}`` (Hydra's convention) without Hydra state."""
    from hydra.utils import instantiate

    if "_target_" not in config:
        raise ValueError(f"model config has no '_target_': {sorted(config)}")
    return instantiate(config, _convert_="all")


def save_model(
    model: nn.Module, config: dict[str, Any], folder: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``folder`` atomically (temp dir, then rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp"))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_NAME))
    (tmp / CONFIG_NAME).write_text(json.dumps({**config, **({"_extra": extra} if extra else {})}, indent=2))
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
    config.pop("_extra", None)
    model = build_from_config(config)
    try:
        state = load_file(str(w_path), device=map_location)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{w_path} is corrupt or not a safetensors file: {e}") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{w_path} does not match {cfg_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def model_extra(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / CONFIG_NAME).read_text()).get("_extra", {})


@torch.no_grad()
def copy_params(dst: nn.Module, src: nn.Module) -> None:
    for pd, ps in zip(dst.parameters(), src.parameters()):
        pd.copy_(ps)
