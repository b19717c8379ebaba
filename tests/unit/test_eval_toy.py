"""Distances to a known distribution: sliced W2, moment errors and mode masses against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from diffdistill.data import GaussianMixtureToy, GaussianToy, SyntheticImages
from diffdistill.evaluation.toy import (
    assign_modes,
    evaluate_toy,
    gaussian_moment_errors,
    gaussian_sliced_w2,
    has_known_distribution,
    mode_masses,
    random_directions,
    sliced_w2,
    toy_reference,
)
from diffdistill.models import Generator
from diffdistill.models.analytic import AffineDenoiser


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ sliced W2
def test_directions_are_seeded_unit_vectors():
    d = random_directions(5, 32, seed=3)
    assert d.shape == (32, 5)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(d, random_directions(5, 32, seed=3))
    assert not torch.allclose(d, random_directions(5, 32, seed=4))


def test_sliced_w2_of_a_translate_is_the_projected_shift():
    """Sorting commutes with a shift, so SW2(a, a + c) = sqrt(mean_theta (theta . c)^2) exactly."""
    a = torch.randn(500, 3, generator=_gen(0))
    c = torch.tensor([0.7, -0.4, 1.2])
    dirs = random_directions(3, 64, seed=1)
    expected = float((dirs @ c).pow(2).mean().sqrt())
    assert sliced_w2(a, a + c, directions=dirs) == pytest.approx(expected, rel=1e-5)
    assert sliced_w2(a, a + c, num_projections=64, seed=1) == pytest.approx(expected, rel=1e-5)
    # the Gaussian closed form with equal covariances reduces to the same number
    cov = torch.eye(3)
    assert gaussian_sliced_w2(torch.zeros(3), cov, c, cov, dirs) == pytest.approx(expected, rel=1e-6)
    assert sliced_w2(a, a, directions=dirs) == 0.0
    # the order of the points does not matter, only the sets
    perm = torch.randperm(500, generator=_gen(2))
    assert sliced_w2(a[perm], a + c, directions=dirs) == pytest.approx(expected, rel=1e-5)


def test_sliced_w2_matches_the_gaussian_closed_form():
    """Per direction W2^2 = (theta.dm)^2 + (sqrt(theta'C1 theta) - sqrt(theta'C2 theta))^2; isotropic average
    |dm|^2 / d + (s1 - s2)^2."""
    d, n = 4, 20000
    m1, m2 = torch.zeros(d), torch.tensor([1.0, -1.0, 0.5, 0.0])
    a = m1 + 1.0 * torch.randn(n, d, generator=_gen(0))
    b = m2 + 2.0 * torch.randn(n, d, generator=_gen(1))
    dirs = random_directions(d, 64, seed=0)
    closed = gaussian_sliced_w2(m1, torch.eye(d), m2, 4.0 * torch.eye(d), dirs)
    assert sliced_w2(a, b, directions=dirs) == pytest.approx(closed, abs=0.03)
    iso = math.sqrt(float((m2 - m1).pow(2).sum()) / d + (2.0 - 1.0) ** 2)
    many = random_directions(d, 20000, seed=5)
    assert gaussian_sliced_w2(m1, torch.eye(d), m2, 4.0 * torch.eye(d), many) == pytest.approx(iso, rel=0.01)
    # anisotropic: only the closed form on the same directions applies
    cov = torch.diag(torch.tensor([0.25, 1.0, 4.0, 9.0]))
    c = m2 + torch.randn(n, d, generator=_gen(2)) * cov.diagonal().sqrt()
    closed = gaussian_sliced_w2(m1, torch.eye(d), m2, cov, dirs)
    assert sliced_w2(a, c, directions=dirs) == pytest.approx(closed, abs=0.03)


def test_exact_vs_exact_sits_at_the_floor_and_a_shift_does_not():
    ds = GaussianToy(dim=16)
    ref = toy_reference(ds, 4096, num_projections=64, projection_seed=0, reference_seed=10)
    floor = ref.floor["sw2"]
    assert floor == pytest.approx(sliced_w2(ref.floor_samples, ref.samples, directions=ref.directions))
    assert 0 < floor < 0.05
    third = ds.exact_samples(4096, _gen(99))
    assert sliced_w2(third, ref.samples, directions=ref.directions) < 2.5 * floor
    shifted = sliced_w2(third + 0.4, ref.samples, directions=ref.directions)
    mu, cov = ds.true_mean(), ds.true_covariance()
    closed = gaussian_sliced_w2(mu + 0.4, cov, mu, cov, ref.directions)
    assert shifted == pytest.approx(closed, abs=2 * floor)
    assert shifted > 5 * floor


def test_sliced_w2_needs_equal_sets():
    with pytest.raises(ValueError, match="same shape"):
        sliced_w2(torch.zeros(10, 2), torch.zeros(11, 2))


# ------------------------------------------------------------------------------------------------ moments
def test_moment_errors_against_known_mean_and_covariance():
    x = torch.randn(300, 3, generator=_gen(0)).double()
    mu, cov = x.mean(0), torch.cov(x.T)  # unbiased sample covariance
    delta = torch.tensor([0.3, 0.0, -0.4], dtype=torch.float64)
    e = torch.tensor([[0.2, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -0.1]], dtype=torch.float64)
    out = gaussian_moment_errors(x, mu + delta, cov + e)
    assert out["mean_error"] == pytest.approx(0.5)
    assert out["cov_error_fro"] == pytest.approx(math.sqrt(0.05))
    assert out["cov_error_rel"] == pytest.approx(math.sqrt(0.05) / float(torch.linalg.matrix_norm(cov + e)))


def test_toy_truths_are_the_closed_forms():
    g = GaussianToy(dim=3, mean=0.3, std=0.8)
    torch.testing.assert_close(g.true_mean(), torch.full((3,), 0.3))
    torch.testing.assert_close(g.true_covariance(), 0.64 * torch.eye(3))
    # K >= 3 equally spaced means on a circle of radius r: covariance (r^2 / 2 + s^2) I, mean 0
    m = GaussianMixtureToy(dim=2, num_components=8, radius=2.0, std=0.1)
    torch.testing.assert_close(m.true_mean(), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(m.true_covariance(), 2.01 * torch.eye(2), atol=1e-5, rtol=0)
    x, labels = m.exact_samples_and_labels(50000, _gen(0))
    torch.testing.assert_close(torch.cov(x.T), m.true_covariance(), atol=0.05, rtol=0)
    assert ((x - m.component_means[labels]).norm(dim=1) < 0.6).all()
    torch.testing.assert_close(m.exact_samples(10, _gen(1)), m.exact_samples(10, _gen(1)))
    # a d > 2 mixture: moments of many exact samples converge to the closed form
    m5 = GaussianMixtureToy(dim=5, num_components=3, radius=1.0, std=0.3)
    x5 = m5.exact_samples(100000, _gen(2))
    out = gaussian_moment_errors(x5, m5.true_mean(), m5.true_covariance())
    assert out["mean_error"] < 0.02 and out["cov_error_rel"] < 0.03


def test_which_datasets_have_a_known_distribution():
    assert has_known_distribution(GaussianToy) and has_known_distribution(GaussianMixtureToy(dim=2))
    assert not has_known_distribution(SyntheticImages(num=4, resolution=8))


# ------------------------------------------------------------------------------------------------ modes
MEANS = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]])


def test_mode_masses_of_known_assignments():
    jitter = 0.05 * torch.randn(10, 2, generator=_gen(0))
    k = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])  # 6 : 3 : 1 : 0, mode 3 missing
    x = MEANS[k] + jitter
    x[0] = torch.tensor([1.0, 0.0])  # still nearest to mode 0, but 10 stds away from it
    out = mode_masses(x, MEANS, stds=0.1, coverage_fraction=0.1)
    assert out["masses"] == pytest.approx([0.6, 0.3, 0.1, 0.0])
    assert out["true_weights"] == pytest.approx([0.25] * 4)
    assert out["mass_error_max"] == pytest.approx(0.35)
    assert out["covered"] == [True, True, True, False]
    assert out["modes_covered"] == 3 and out["num_modes"] == 4
    assert out["high_quality_fraction"] == pytest.approx(0.9)
    # a stricter coverage threshold: mass >= 0.5 * 0.25
    assert mode_masses(x, MEANS, coverage_fraction=0.5)["modes_covered"] == 2
    # non-uniform weights are the reference of the mass error
    w = torch.tensor([0.6, 0.3, 0.1, 0.0])
    assert mode_masses(x, MEANS, weights=w)["mass_error_max"] == pytest.approx(0.0, abs=1e-6)
    # class-conditional: how often a sample lands on its own class's mode
    assert mode_masses(x, MEANS, labels=k)["class_accuracy"] == 1.0
    assert mode_masses(x, MEANS, labels=torch.zeros(10, dtype=torch.long))["class_accuracy"] == pytest.approx(0.6)


def test_posterior_assignment_uses_stds_and_weights():
    means = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    x = torch.tensor([[0.9, 0.0]])
    assert assign_modes(x, means).tolist() == [0]  # nearest mean
    # log N: comp 0 (s = 0.1): -0.5 * 0.81 / 0.01 - 2 log 0.1 = -35.9; comp 1 (s = 1): -0.5 * 1.21 = -0.6
    assert assign_modes(x, means, torch.tensor([0.1, 1.0]), assignment="posterior").tolist() == [1]
    # a weight small enough flips it back: log(w1 / w0) < -35.3
    w = torch.tensor([1.0, 1e-16])
    assert assign_modes(x, means, torch.tensor([0.1, 1.0]), w, assignment="posterior").tolist() == [0]
    with pytest.raises(ValueError, match="assignment"):
        assign_modes(x, means, assignment="soft")


def test_exact_mixture_samples_cover_every_mode_and_a_dropped_mode_does_not():
    ds = GaussianMixtureToy(dim=2, num_components=8)
    x, labels = ds.exact_samples_and_labels(8000, _gen(0))
    args = (ds.component_means, ds.component_stds, ds.component_weights)
    exact = mode_masses(x, *args)
    assert exact["modes_covered"] == 8 and exact["mass_error_max"] < 0.02
    assert assign_modes(x, ds.component_means).tolist() == labels.tolist()
    collapsed = x.clone()
    collapsed[labels == 3] = x[labels == 3] - ds.component_means[3] + ds.component_means[0]
    out = mode_masses(collapsed, *args, assignment="posterior")
    assert out["masses"][3] == 0.0 and out["covered"][3] is False and out["modes_covered"] == 7
    assert out["masses"][0] == pytest.approx(float(((labels == 0) | (labels == 3)).double().mean()))
    assert out["mass_error_max"] >= 0.125


# ------------------------------------------------------------------------------------------------ evaluate_toy
def _affine_generator(a: float, b: float, dim: int = 16) -> Generator:
    """One step from 80 z gives a z + b: exact for N(b, a^2 I)."""
    return Generator(AffineDenoiser(dim=dim, a_init=a, b_init=b), sigma_init=80.0)


def test_an_exact_generator_scores_at_the_floor_and_a_wrong_one_does_not():
    ds = GaussianToy(dim=16, mean=0.3, std=0.8)
    kw = dict(num_samples=2048, num_projections=64, reference_seed=100_000)
    ref = toy_reference(ds, 2048, 64, 0, 100_000)
    exact = evaluate_toy(_affine_generator(0.8, 0.3), ds, **kw, reference=ref)
    floor = ref.floor
    assert exact.scores["sw2"] < 2.5 * floor["sw2"]
    assert exact.scores["cov_error_rel"] < 3 * floor["cov_error_rel"]
    wrong = evaluate_toy(_affine_generator(0.5, -0.2), ds, **kw, reference=ref)
    closed = gaussian_sliced_w2(
        torch.full((16,), -0.2), 0.25 * torch.eye(16), ds.true_mean(), ds.true_covariance(), ref.directions
    )
    assert wrong.scores["sw2"] == pytest.approx(closed, abs=2 * floor["sw2"])
    assert wrong.scores["sw2"] > 10 * floor["sw2"]
    assert wrong.scores["mean_error"] == pytest.approx(0.5 * 4, abs=0.05)  # |(-0.2 - 0.3) 1_16|
    assert wrong.scores["cov_error_rel"] == pytest.approx((0.64 - 0.25) / 0.64, abs=0.05)
    p = wrong.protocol
    assert p["num_samples"] == 2048 and p["seed_range"] == [0, 2047]
    assert p["sliced_w2"]["num_projections"] == 64 and p["exact_samples"]["seeds"] == [100_000, 100_001]
    assert p["exact_vs_exact"] == floor and p["sampler"]["sampler_steps"] == 1


def test_scores_do_not_depend_on_the_batch_size():
    ds = GaussianToy(dim=4)
    gen = _affine_generator(0.6, 0.1, dim=4)
    kw = dict(num_samples=300, num_projections=16, reference_seed=5000)
    a = evaluate_toy(gen, ds, batch_size=300, **kw).scores
    b = evaluate_toy(gen, ds, batch_size=7, **kw).scores
    assert a == b


def test_generated_and_exact_seeds_must_not_overlap():
    with pytest.raises(ValueError, match="overlap"):
        evaluate_toy(_affine_generator(0.8, 0.3), GaussianToy(), num_samples=100, seed=0, reference_seed=50)
