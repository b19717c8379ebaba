"""Decoding one image file to a uint8 ``[C, H, W]`` tensor, and the dataset x-flip (horizontal mirror).

The same functions serve the in-memory :func:`~diffdistill.data.ImageFolder` and the streamed datasets, so a
folder read either way gives the same pixels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

RESIZE_MODES = ("center_crop", "none")
_PIL_MODES = {1: "L", 3: "RGB"}


def check_image_options(resolution: int, channels: int, resize: str) -> None:
    """One line naming the data key for an impossible resolution, channel count or resize mode."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"data.resolution must be an integer >= 2, got {resolution!r}")
    if channels not in _PIL_MODES or isinstance(channels, bool):
        raise ValueError(f"data.channels must be 1 or 3, got {channels!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"data.resize must be one of {list(RESIZE_MODES)}, got {resize!r}")


def decode_image(
    source: str | Path | bytes, resolution: int, channels: int = 3, resize: str = "center_crop", name: str = ""
) -> Tensor:
    """A file path or encoded bytes as uint8 ``[channels, resolution, resolution]``.

    ``resize="center_crop"`` crops the central square and resizes it (bicubic) to ``resolution``;
    ``resize="none"`` requires the image to be ``resolution x resolution`` already (a prepared dataset) and
    rejects any other size. ``name`` (the file, or archive member) is what error messages cite.
    """
    from PIL import Image, UnidentifiedImageError

    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im = im.convert(_PIL_MODES[channels])
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image '{name}' ({type(e).__name__}: {e}); remove or replace the file") from e
    w, h = im.size
    if resize == "none":
        if (w, h) != (resolution, resolution):
            raise ValueError(
                f"image '{name}' is {w}x{h}, not {resolution}x{resolution}: with data.resize=none every image must "
                "already have the size data.resolution (or use data.resize=center_crop)"
            )
    else:
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != resolution:
            im = im.resize((resolution, resolution), Image.BICUBIC)
    a = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(a[None].copy() if a.ndim == 2 else a.transpose(2, 0, 1).copy())


def horizontal_flip(images: Tensor) -> Tensor:
    """Mirror the last (width) axis (torchvision transforms v2)."""
    from torchvision.transforms.v2.functional import horizontal_flip as tv_horizontal_flip

    return tv_horizontal_flip(images)


def xflip_index(index: int, num_raw: int, xflip: bool) -> tuple[int, bool]:
    """Dataset index to ``(raw index, mirrored?)``: with x-flip the dataset is twice as long and its second half
    is the mirror image of the first (the EDM convention, ``training/dataset.py`` of NVlabs/edm, arXiv:2206.00364),
    so flips are fixed by the index, not by a random draw, and replay exactly on resume."""
    if not 0 <= index < (2 * num_raw if xflip else num_raw):
        raise IndexError(f"index {index} out of range")
    return (index - num_raw, True) if index >= num_raw else (index, False)
