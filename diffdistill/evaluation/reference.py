"""Reference statistics of a real dataset, cached in the project cache (never in clean-fid's site-packages).

A cache file ``cache_dir()/refstats/<key>.npz`` holds ``mu``, ``sigma`` (float64), the features (float32, for
KID and precision/recall) and a JSON ``meta`` record. The key covers the dataset name, split, resolution,
number of images, extractor id and the extractor's weights sha256, so changing any of them recomputes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffdistill.evaluation.extractors import FeatureExtractor
from diffdistill.evaluation.metrics import feature_stats
from diffdistill.utils.paths import cache_dir


@dataclass
class ReferenceStats:
    """Features and Gaussian statistics of a reference set."""

    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])

    @classmethod
    def from_features(cls, features: np.ndarray, meta: dict[str, Any] | None = None) -> ReferenceStats:
        mu, sigma = feature_stats(features)
        return cls(np.asarray(features, np.float32), mu, sigma, dict(meta or {}))

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, features=self.features, mu=self.mu, sigma=self.sigma, meta=json.dumps(self.meta))
        os.replace(tmp, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["features"], z["mu"], z["sigma"], json.loads(str(z["meta"])), Path(path))


def dataset_images(dataset: Any) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` from an :class:`~diffdistill.data.ImageTensorDataset` (or a uint8 tensor)."""
    images = dataset if torch.is_tensor(dataset) else getattr(dataset, "images", None)
    if images is None or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            "reference must be an image dataset with uint8 .images [N, C, H, W] (e.g. "
            "diffdistill.data.FashionMNIST(...)) or such a tensor"
        )
    return images


def describe_dataset(dataset: Any, split: str | None = None) -> dict[str, Any]:
    """Name, split and resolution of a dataset for cache keys and results JSONs."""
    images = dataset_images(dataset)
    name = getattr(dataset, "name", "tensor")
    if split is None:  # diffdistill dataset names look like "fashion_mnist-train-32"
        m = re.search(r"-(train|test|val|validation)(?:-|$)", name)
        split = m.group(1) if m else "na"
    return {
        "dataset": name,
        "split": split,
        "resolution": int(images.shape[-1]),
        "channels": int(images.shape[1]),
        "dataset_size": int(images.shape[0]),
    }


def reference_key(dataset_info: dict[str, Any], extractor: FeatureExtractor, num_images: int) -> str:
    """Cache file stem: dataset, split, resolution, number of images, extractor id, weights hash."""
    sha = (extractor.weights_sha256 or "noweights")[:16]
    raw = (
        f"{dataset_info['dataset']}_{dataset_info['split']}_{dataset_info['resolution']}px_n{num_images}_"
        f"{extractor.id}_{sha}"
    )
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", raw)


def select_indices(n_total: int, num_images: int | None, seed: int = 0) -> torch.Tensor:
    """All indices, or a seeded random subset of ``num_images`` (sorted)."""
    if num_images is None or num_images >= n_total:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:num_images].sort().values


def reference_stats(
    dataset: Any,
    extractor: FeatureExtractor,
    num_images: int | None = None,
    split: str | None = None,
    batch_size: int = 64,
    cache: bool = True,
    cache_root: str | Path | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> ReferenceStats:
    """Reference statistics of ``dataset`` (all images, or a seeded subset of ``num_images``), cached.

    The cache lives in ``cache_root`` (default ``cache_dir()/refstats``); ``cache=False`` always recomputes.
    """
    images = dataset_images(dataset)
    info = describe_dataset(dataset, split)
    idx = select_indices(images.shape[0], num_images, seed)
    n = int(idx.numel())
    root = Path(cache_root) if cache_root is not None else cache_dir() / "refstats"
    key = reference_key(info, extractor, n) + ("" if n == images.shape[0] else f"_subset-s{seed}")
    path = root / f"{key}.npz"
    if cache and path.is_file():
        try:
            return ReferenceStats.load(path)
        except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed
            pass
    if verbose:
        print(f"computing reference statistics {key} ({n} images) ...")
    feats = extractor.extract(images[idx], batch_size=batch_size)
    meta = {
        **info,
        "num_images": n,
        "subset_seed": None if n == images.shape[0] else seed,
        **{f"extractor_{k}" if k != "extractor" else k: v for k, v in extractor.protocol().items()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    stats = ReferenceStats.from_features(feats, meta)
    if cache:
        stats.save(path)
    return stats


def folder_features(
    folder: str | Path, extractor: FeatureExtractor, batch_size: int = 64, num_images: int | None = None
) -> np.ndarray:
    """Features of an image folder through clean-fid's ``get_folder_features`` with this extractor and resize."""
    from cleanfid.fid import get_folder_features

    return get_folder_features(
        str(folder),
        model=extractor,
        num_workers=0,
        num=num_images,
        batch_size=batch_size,
        device=extractor.device,
        mode="clean",
        custom_fn_resize=extractor.resize,
        verbose=False,
    ).astype(np.float32)


def save_images(images: torch.Tensor, folder: str | Path, start: int = 0) -> Path:
    """Write uint8 images ``[N, C, H, W]`` as lossless PNGs ``000000.png`` ... (grayscale stays 1-channel)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        a = im.permute(1, 2, 0).numpy()
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(folder / f"{start + i:06d}.png")
    return folder
