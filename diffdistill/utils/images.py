"""Image grids and conversions: plain PNG grids and labelled, upscaled side-by-side panels."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image as PILImage
    from PIL import ImageFont

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def to_uint8(x: Tensor) -> Tensor:
    """``[-1, 1]`` floats -> uint8 ``[0, 255]`` (round to nearest)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_png(img: PILImage.Image, path: str | Path) -> Path:
    """Write ``img`` to ``path`` as PNG through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def grid_image(images: Tensor, nrow: int = 8, padding: int = 1, scale: int = 1) -> PILImage.Image:
    """``[B, C, H, W]`` images in ``[-1, 1]`` as one RGB grid (white padding), upscaled ``scale`` x (nearest)."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=padding, pad_value=1.0)
    arr = (grid * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # as torchvision's save_image
    img = Image.fromarray(arr).convert("RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled default font at ``size`` px (the fixed bitmap font where FreeType is missing)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _fit_font(text: str, width: int, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The largest default font not above ``size`` px in which ``text`` fits in ``width`` px (down to 8 px)."""
    font = load_font(size)
    while size > 8 and font.getlength(text) > width:
        size -= 1
        font = load_font(size)
    return font


def _header(text: str, width: int, size: int) -> PILImage.Image:
    """A white strip ``width`` px wide with ``text`` centred in black."""
    from PIL import Image, ImageDraw

    font = _fit_font(text, width - 8, size)
    left, top, right, bottom = font.getbbox(text)
    pad = max(4, size // 3)
    strip = Image.new("RGB", (width, bottom + 2 * pad), WHITE)
    ImageDraw.Draw(strip).text(((width - (right - left)) // 2 - left, pad), text, fill=BLACK, font=font)
    return strip


def side_by_side_image(
    panels: list[Tensor],
    labels: list[str] | None = None,
    title: str | None = None,
    nrow: int = 8,
    gap: int = 16,
    min_panel_width: int = 512,
) -> PILImage.Image:
    """Several image batches as grids placed left to right, each under its label, with an optional title.

    Each grid is upscaled by an integer factor (nearest neighbour, so pixels stay sharp) until it is at least
    ``min_panel_width`` px wide; the text uses PIL's default font sized to the panel.

    Args:
        panels: ``[B, C, H, W]`` batches in ``[-1, 1]`` (same seeds per cell, e.g. teacher | student).
        labels: one header per panel (``None``: no headers).
        title: one line above everything (e.g. the objective and training step).
        nrow: images per grid row.
        gap: white pixels between panels (and around the figure when it has a title or labels).
        min_panel_width: smallest width of one panel after upscaling (0 = no upscaling).
    """
    from PIL import Image

    if labels is not None and len(labels) != len(panels):
        raise ValueError(f"{len(labels)} labels for {len(panels)} panels")
    base = grid_image(panels[0], nrow=nrow)
    scale = max(1, math.ceil(min_panel_width / base.width)) if min_panel_width > 0 else 1
    grids = [grid_image(p, nrow=nrow, scale=scale) for p in panels]
    pw = max(g.width for g in grids)
    size = max(12, min(32, pw // 24))
    heads = [_header(t, pw, size) for t in labels] if labels is not None else []
    head_h = max((h.height for h in heads), default=0)
    margin = gap if (labels is not None or title) else 0
    width = len(grids) * pw + (len(grids) - 1) * gap + 2 * margin
    top = _header(title, width - 2 * margin, round(size * 1.2)) if title else None
    top_h = top.height if top is not None else 0
    height = margin + top_h + head_h + max(g.height for g in grids) + margin
    canvas = Image.new("RGB", (width, height), WHITE)
    if top is not None:
        canvas.paste(top, (margin, margin))
    for i, g in enumerate(grids):
        x = margin + i * (pw + gap)
        if heads:
            canvas.paste(heads[i], (x, margin + top_h))
        canvas.paste(g, (x, margin + top_h + head_h))
    return canvas


def save_grid(images: Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Save ``[B, C, H, W]`` images in ``[-1, 1]`` as one PNG grid (written atomically)."""
    return save_png(grid_image(images, nrow=nrow), path)


def save_side_by_side(
    panels: list[Tensor],
    path: str | Path,
    nrow: int = 8,
    gap: int = 4,
    labels: list[str] | None = None,
    title: str | None = None,
    min_panel_width: int = 0,
) -> Path:
    """Save several image batches as grids placed left to right (e.g. teacher | student), same seeds per cell.

    Without ``labels``, ``title`` and ``min_panel_width`` this is the plain grid at native resolution; see
    :func:`side_by_side_image` for the labelled, upscaled figure.
    """
    return save_png(side_by_side_image(panels, labels, title, nrow, gap, min_panel_width), path)


def figure_to_image(fig) -> PILImage.Image:
    """A drawn matplotlib figure as an RGB PIL image (for trackers)."""
    import numpy as np
    from PIL import Image

    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
