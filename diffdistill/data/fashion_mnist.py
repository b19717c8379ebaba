"""Fashion-MNIST (Xiao et al. 2017) read from IDX files, padded to 32x32 and scaled to ``[-1, 1]``.

Search order for the files: an explicit ``root``, ``$DIFFDISTILL_FASHION_MNIST``, the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), then (only with ``download=True``)
torchvision's downloader into the project cache.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from diffdistill.data.images import ImageTensorDataset
from diffdistill.utils.paths import cache_dir

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# the class names as caption words (lower case, the '/' dropped): what the packaged text-to-image teacher was trained on
PROMPT_WORDS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 array, checking its magic number."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"could not read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).exists():
            return root / name
    return None


def locate_fashion_mnist(root: str | None = None, download: bool = False) -> Path:
    if root is not None:  # an explicit folder is the only place looked at
        if not Path(root).is_dir():
            raise FileNotFoundError(f"Fashion-MNIST root '{root}' does not exist (data.root).")
        if _find(Path(root), _FILES["train"][0]) is None and _find(Path(root), _FILES["test"][0]) is None:
            raise FileNotFoundError(f"no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz]...) in '{root}'")
        return Path(root)
    candidates = [Path(p) for p in (os.environ.get("DIFFDISTILL_FASHION_MNIST"), DEBIAN_ROOT) if p]
    for c in candidates:
        if c.is_dir() and _find(c, _FILES["train"][0]) is not None:
            return c
    if download:
        from torchvision.datasets import FashionMNIST as TVFashion

        target = cache_dir() / "datasets"
        TVFashion(str(target), train=True, download=True)
        TVFashion(str(target), train=False, download=True)
        return target / "FashionMNIST" / "raw"
    raise FileNotFoundError(
        "Fashion-MNIST IDX files not found (looked in: "
        + ", ".join(str(c) for c in candidates)
        + "). Install the Debian package `dataset-fashion-mnist`, point `data.root` (or "
        "$DIFFDISTILL_FASHION_MNIST) at a folder with train-images-idx3-ubyte.gz etc., or set `data.download=true`."
    )


def FashionMNIST(
    root: str | None = None,
    split: str = "train",
    resolution: int = 32,
    download: bool = False,
    limit: int | None = None,
    xflip: bool = False,
    channels: int = 1,
    prompts: str | None = None,
    keep_labels: bool = True,
) -> ImageTensorDataset:
    """Fashion-MNIST as an in-memory :class:`ImageTensorDataset` (uint8, padded to ``resolution``); ``xflip`` adds the
    mirror image of every sample; ``channels=3`` replicates the grey channel (RGB networks and VAEs).

    ``prompts`` (a template such as ``"a photo of a {}"``) gives every sample a caption, the template filled with its
    class word (``PROMPT_WORDS``; :class:`~diffdistill.data.prompts.CaptionedImages`): text-to-image teachers
    condition on it; with ``keep_labels=False`` the batches carry the captions only.
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {list(_FILES)}, got '{split}'")
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 or 3, got {channels}")
    folder = locate_fashion_mnist(root, download)
    img_stem, lab_stem = _FILES[split]
    images = read_idx(_find(folder, img_stem))
    labels = read_idx(_find(folder, lab_stem))
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = torch.from_numpy(images.copy())[:, None]  # [N, 1, 28, 28]
    if resolution > 28:
        pad = resolution - 28
        if pad % 2:
            raise ValueError(f"resolution above 28 must be 28 + an even number (padding), got {resolution}")
        images = torch.nn.functional.pad(images, (pad // 2,) * 4)
    elif resolution < 28:  # downsampled copies for smoke tests (area average of the 32x32 padded image)
        padded = torch.nn.functional.pad(images, (2, 2, 2, 2)).float()
        images = (
            torch.nn.functional.interpolate(padded, size=(resolution, resolution), mode="area").round().to(torch.uint8)
        )
    if channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    name = f"fashion_mnist-{split}-{resolution}" + ("-rgb" if channels == 3 else "")
    data = ImageTensorDataset(
        images,
        torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
        name=name,
        class_names=CLASSES,
        xflip=xflip,
    )
    if prompts is None:
        return data
    from diffdistill.data.prompts import CaptionedImages

    return CaptionedImages(data, prompts, keep_labels, words=PROMPT_WORDS)
