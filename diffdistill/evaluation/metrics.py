"""Sample-quality metrics on feature arrays.

* FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) through clean-fid's own functions
  (``cleanfid.fid.frechet_distance``, ``cleanfid.fid.kernel_distance``), not a rewrite;
* improved precision / recall (Kynkäänniemi et al. 2019): k-NN hyperspheres around each sample;
* CLIP score (Hessel et al. 2021): ``100 * max(cos(E_I, E_T), 0)`` per sample, averaged, with the torchmetrics
  variant (clamp applied to the mean) reported beside it; CLIP-FID is FID on CLIP image features.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch
from torch import Tensor


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov``, unbiased) in float64, as clean-fid computes them."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors [N, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians, by ``cleanfid.fid.frechet_distance`` (its print is captured)."""
    from cleanfid.fid import frechet_distance as cf_frechet

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)  # scipy sqrtm(disp=)
        return float(cf_frechet(mu1, sigma1, mu2, sigma2))


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets ``[N1, D]`` and ``[N2, D]`` (same as ``cleanfid.fid.fid_from_feats``)."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def kid(
    features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> float:
    """KID by ``cleanfid.fid.kernel_distance`` (cubic polynomial-kernel MMD over random subsets).

    clean-fid draws the subsets from the global numpy RNG; it is seeded with ``seed`` here and restored after.
    """
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(
            kernel_distance(
                np.asarray(features1, np.float64),
                np.asarray(features2, np.float64),
                num_subsets=num_subsets,
                max_subset_size=max_subset_size,
            )
        )
    finally:
        np.random.set_state(state)


def _kth_nn_radii(x: Tensor, k: int, block: int = 1024) -> Tensor:
    """Distance from each row of ``x`` to its ``k``-th nearest neighbour in ``x`` (itself excluded)."""
    if x.shape[0] <= k:
        raise ValueError(f"need more than k={k} samples for the k-NN manifold, got {x.shape[0]}")
    out = []
    for i in range(0, x.shape[0], block):
        d = torch.cdist(x[i : i + block], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (distance 0)
    return torch.cat(out)


def _in_manifold(query: Tensor, support: Tensor, radii: Tensor, block: int = 1024) -> Tensor:
    """For each query row: is it inside at least one support hypersphere ``||q - s|| <= r_s``?"""
    out = []
    for i in range(0, query.shape[0], block):
        d = torch.cdist(query[i : i + block], support)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), ``k = 3`` as in the paper.

    precision: fraction of generated samples inside the real manifold (union of k-NN balls of real features);
    recall: fraction of real samples inside the generated manifold.
    """
    r = torch.from_numpy(np.asarray(real, np.float64))
    f = torch.from_numpy(np.asarray(fake, np.float64))
    r_radii, f_radii = _kth_nn_radii(r, k), _kth_nn_radii(f, k)
    precision = _in_manifold(f, r, r_radii).double().mean().item()
    recall = _in_manifold(r, f, f_radii).double().mean().item()
    return {"precision": precision, "recall": recall}


def clip_score(image_embeds: Tensor, text_embeds: Tensor) -> dict[str, float]:
    """CLIP score of paired embeddings ``[N, D]`` (normalised here).

    Returns ``clip_score`` = mean over samples of ``100 * max(cos, 0)`` (Hessel et al. 2021 with w = 100),
    ``clip_score_torchmetrics`` = ``max(mean(100 * cos), 0)`` (torchmetrics clamps the mean), and the raw
    mean cosine ``clip_cosine``.
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image and text embeddings differ in shape: {tuple(image_embeds.shape)} vs {tuple(text_embeds.shape)}"
        )
    i = image_embeds.double() / image_embeds.double().norm(dim=-1, keepdim=True)
    t = text_embeds.double() / text_embeds.double().norm(dim=-1, keepdim=True)
    cos = (i * t).sum(dim=-1)
    return {
        "clip_score": (100.0 * cos.clamp(min=0)).mean().item(),
        "clip_score_torchmetrics": max((100.0 * cos).mean().item(), 0.0),
        "clip_cosine": cos.mean().item(),
    }
