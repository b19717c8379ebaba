"""Image grids and conversions."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """``[-1, 1]`` floats -> uint8 ``[0, 255]`` (round to nearest)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Save ``[B, C, H, W]`` images in ``[-1, 1]`` as one PNG grid (written atomically)."""
    import os

    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    save_image((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, tmp, nrow=nrow, padding=1, pad_value=1.0)
    os.replace(tmp, path)
    return path


def save_side_by_side(panels: list[Tensor], path: str | Path, nrow: int = 8, gap: int = 4) -> Path:
    """Save several image batches as grids placed left to right (e.g. teacher | student), same seeds per cell."""
    import os

    from torchvision.utils import make_grid, save_image

    grids = [
        make_grid((p.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1, pad_value=1.0) for p in panels
    ]
    sep = torch.ones(grids[0].shape[0], grids[0].shape[1], gap)
    parts = [t for g in grids for t in (g, sep)][:-1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    save_image(torch.cat(parts, dim=2), tmp)
    os.replace(tmp, path)
    return path
