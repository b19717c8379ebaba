"""FID / KID / precision-recall / CLIP score on feature arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffdistill.evaluation import metrics as M


def _feats(seed: int, n: int = 300, d: int = 8, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_fid_identical_sets_is_zero():
    a = _feats(0)
    assert abs(M.fid(a, a)) < 1e-6


def test_fid_positive_and_symmetric():
    a, b = _feats(0), _feats(1, shift=0.5)
    ab, ba = M.fid(a, b), M.fid(b, a)
    assert ab > 1.0  # mean shift of 0.5 in 8 dims alone gives 2.0
    assert ab == pytest.approx(ba, rel=1e-6)


def test_fid_equals_cleanfid_and_closed_form():
    from cleanfid.fid import fid_from_feats

    a, b = _feats(2), _feats(3, shift=0.3)
    assert M.fid(a, b) == pytest.approx(fid_from_feats(a, b), rel=1e-9)
    # isotropic Gaussians with the *exact* same covariance: FID = ||mu1 - mu2||^2
    mu1, mu2, cov = np.zeros(4), np.full(4, 0.5), np.eye(4) * 2.0
    assert M.frechet_distance(mu1, cov, mu2, cov) == pytest.approx(1.0, abs=1e-8)


def test_fid_grows_with_shift():
    a = _feats(0)
    assert M.fid(a, _feats(1, shift=0.2)) < M.fid(a, _feats(1, shift=1.0))


def test_kid_seeded_and_leaves_numpy_rng_alone():
    a, b = _feats(0, n=200), _feats(1, n=200, shift=0.5)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    k1 = M.kid(a, b, num_subsets=20, max_subset_size=100, seed=0)
    assert np.array_equal(np.random.get_state()[1], before)
    assert k1 == M.kid(a, b, num_subsets=20, max_subset_size=100, seed=0)
    assert k1 > 0.01
    assert abs(M.kid(a, _feats(5, n=200), num_subsets=20, max_subset_size=100)) < k1 / 5


def test_precision_recall_cases():
    real = _feats(0, n=200, d=4)
    same = M.precision_recall(real, _feats(1, n=200, d=4), k=3)
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    far = M.precision_recall(real, _feats(1, n=200, d=4, shift=20.0), k=3)
    assert far == {"precision": 0.0, "recall": 0.0}
    # mode collapse: fakes all near one real point -> high precision, low recall
    collapsed = real[:1] + 0.01 * _feats(2, n=200, d=4)
    pr = M.precision_recall(real, collapsed, k=3)
    assert pr["precision"] > 0.9 and pr["recall"] < 0.2


def test_precision_recall_needs_more_than_k():
    with pytest.raises(ValueError, match="k=3"):
        M.precision_recall(_feats(0, n=3), _feats(1, n=10), k=3)


def test_clip_score_per_sample_clamp_vs_torchmetrics():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])  # cos = 1, -1, 1
    s = M.clip_score(img, txt)
    assert s["clip_score"] == pytest.approx(100 * (1 + 0 + 1) / 3)
    assert s["clip_score_torchmetrics"] == pytest.approx(100 * (1 - 1 + 1) / 3)
    assert s["clip_cosine"] == pytest.approx(1 / 3)
    assert M.clip_score(img, -txt)["clip_score_torchmetrics"] == 0.0
