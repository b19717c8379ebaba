"""Distances to a known data distribution, for toy runs (``data=toy_gaussian``, ``data=toy_gmm``).

A toy dataset with a known distribution exposes ``exact_samples(n, generator)``, ``true_mean()`` and
``true_covariance()``; a mixture also ``component_means``, ``component_stds`` and ``component_weights``
(see :mod:`diffdistill.data.toy`). Against it a generator is scored by

* moment errors: ``|mean(x) - mu|_2``, ``|cov(x) - Sigma|_F`` and ``|cov(x) - Sigma|_F / |Sigma|_F``;
* the sliced Wasserstein-2 distance (Rabin et al. 2011; Bonneel et al. 2015)
  ``SW2(p, q) = (E_theta W2^2(theta#p, theta#q))^(1/2)`` over fixed random unit directions, against an exact
  sample set of the same size, reported with its *floor*: SW2 between two independent exact sets of that size
  on the same directions (what a perfect generator scores at this sample size);
* for mixtures, mode coverage: the fraction of samples assigned to each component (nearest mean or highest
  posterior) against the true weights, the largest absolute mass error, the number of modes covered, and the
  fraction of samples within ``quality_std`` standard deviations of their mode (the "high-quality samples" of
  Srivastava et al. 2017, VEEGAN).

Generated sample ``i`` draws its noise from ``torch.Generator().manual_seed(seed + i)``
(:mod:`diffdistill.evaluation.generation`), so a score depends on ``(model, seed, num_samples)`` only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diffdistill.evaluation.generation import CondFn, SamplerSpec, class_conditioning, sample_batch, sampler_spec

ASSIGNMENTS = ("nearest", "posterior")
MIXTURE_ATTRS = ("component_means", "component_stds", "component_weights")


def has_known_distribution(dataset: Any) -> bool:
    """Whether ``dataset`` (an instance or a class) exposes its exact distribution."""
    return all(callable(getattr(dataset, m, None)) for m in ("exact_samples", "true_mean", "true_covariance"))


def is_mixture(dataset: Any) -> bool:
    """Whether ``dataset`` is a known mixture (component means, stds and weights)."""
    return all(getattr(dataset, a, None) is not None for a in MIXTURE_ATTRS)


# ------------------------------------------------------------------------------------------------ pure functions
def random_directions(dim: int, num_projections: int, seed: int = 0) -> Tensor:
    """``num_projections`` unit directions ``[P, dim]``, uniform on the sphere, from ``manual_seed(seed)``."""
    d = torch.randn(num_projections, dim, generator=torch.Generator().manual_seed(int(seed)))
    return d / d.norm(dim=1, keepdim=True)


def sliced_w2(
    a: Tensor, b: Tensor, num_projections: int = 128, seed: int = 0, *, directions: Tensor | None = None
) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point sets ``[n, d]``.

    ``sqrt(mean_theta mean_i (sort(a theta)_i - sort(b theta)_i)^2)``: on each direction the 1-D W2 between
    equal-size empirical measures matches sorted projections. The directions are ``directions`` (``[P, d]``,
    unit rows) if given, else ``random_directions(d, num_projections, seed)``.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"sliced_w2 needs two [n, d] sets of the same shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    dirs = random_directions(a.shape[1], num_projections, seed) if directions is None else directions
    dirs = dirs.to(a)
    pa, pb = (a @ dirs.T).sort(0).values, (b.to(a) @ dirs.T).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def gaussian_sliced_w2(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor, directions: Tensor) -> float:
    """Closed-form SW2 between ``N(mean_a, cov_a)`` and ``N(mean_b, cov_b)`` on ``directions`` ``[P, d]``.

    Per unit direction ``theta`` both projections are 1-D Gaussians, and
    ``W2^2 = (theta.(m_a - m_b))^2 + (sqrt(theta' C_a theta) - sqrt(theta' C_b theta))^2``. For isotropic
    covariances ``s^2 I`` and uniform directions the average is ``|m_a - m_b|^2 / d + (s_a - s_b)^2``.
    """
    dirs = directions.double()
    dm = dirs @ (mean_a.double() - mean_b.double())
    sa = torch.einsum("pi,ij,pj->p", dirs, cov_a.double(), dirs).clamp_min(0).sqrt()
    sb = torch.einsum("pi,ij,pj->p", dirs, cov_b.double(), dirs).clamp_min(0).sqrt()
    return float((dm**2 + (sa - sb) ** 2).mean().sqrt())


def gaussian_moment_errors(x: Tensor, mean: Tensor, cov: Tensor) -> dict[str, float]:
    """Errors of the sample mean and covariance of ``x`` ``[n, d]`` against the true ``mean`` and ``cov``.

    Returns ``mean_error = |mean(x) - mu|_2``, ``cov_error_fro = |cov(x) - Sigma|_F`` and
    ``cov_error_rel = |cov(x) - Sigma|_F / |Sigma|_F`` (unbiased sample covariance).
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"moment errors need [n >= 2, d] samples, got {tuple(x.shape)}")
    x = x.double()
    mean, cov = mean.double().reshape(-1), cov.double()
    err = torch.linalg.matrix_norm(torch.cov(x.T).reshape(cov.shape) - cov)
    return {
        "mean_error": float((x.mean(0) - mean).norm()),
        "cov_error_fro": float(err),
        "cov_error_rel": float(err / torch.linalg.matrix_norm(cov)),
    }


def assign_modes(
    x: Tensor,
    means: Tensor,
    stds: Tensor | float | None = None,
    weights: Tensor | None = None,
    assignment: str = "nearest",
) -> Tensor:
    """The component of each sample (``[n]`` int): the nearest mean, or the highest posterior
    ``log pi_k - |x - mu_k|^2 / (2 s_k^2) - d log s_k`` of isotropic components (``assignment="posterior"``)."""
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got '{assignment}'")
    x, means = x.double(), means.double()
    dist2 = torch.cdist(x, means) ** 2  # [n, K]
    if assignment == "nearest":
        return dist2.argmin(1)
    if stds is None:
        raise ValueError("posterior assignment needs the component stds")
    K, d = means.shape
    s = torch.as_tensor(stds, dtype=torch.float64).expand(K)
    w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else weights.double() / weights.sum()
    logp = w.log()[None] - 0.5 * dist2 / s[None] ** 2 - d * s.log()[None]
    return logp.argmax(1)


def mode_masses(
    x: Tensor,
    means: Tensor,
    stds: Tensor | float | None = None,
    weights: Tensor | None = None,
    assignment: str = "nearest",
    coverage_fraction: float = 0.1,
    quality_std: float | None = 3.0,
    labels: Tensor | None = None,
) -> dict[str, Any]:
    """Mode coverage of samples ``x`` ``[n, d]`` of a mixture with ``means`` ``[K, d]``.

    Every sample is assigned to one component (:func:`assign_modes`); the mass of component ``k`` is the fraction
    of samples assigned to it. Component ``k`` counts as covered when its mass is at least
    ``coverage_fraction * weights[k]``. With ``stds``, ``high_quality_fraction`` is the fraction of samples within
    ``quality_std * s_k`` of their component's mean (Srivastava et al. 2017; in ``d > 2`` dimensions exact samples
    score below 1 too: compare with the exact-vs-exact floor). With ``labels`` (class-conditional generation),
    ``class_accuracy`` is the fraction of samples assigned to their own class's component.

    Returns ``masses`` and ``true_weights`` (lists), ``mass_error_max = max_k |mass_k - pi_k|``,
    ``modes_covered``, ``num_modes``, ``covered`` (list of bools) and the optional fractions.
    """
    K = means.shape[0]
    w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else weights.double() / weights.double().sum()
    k = assign_modes(x, means, stds, weights, assignment)
    masses = torch.bincount(k, minlength=K).double() / max(len(x), 1)
    covered = masses >= coverage_fraction * w.double()
    out: dict[str, Any] = {
        "assignment": assignment,
        "masses": [round(float(m), 6) for m in masses],
        "true_weights": [round(float(v), 6) for v in w],
        "mass_error_max": float((masses - w.double()).abs().max()),
        "modes_covered": int(covered.sum()),
        "num_modes": K,
        "covered": [bool(c) for c in covered],
    }
    if stds is not None and quality_std is not None:
        s = torch.as_tensor(stds, dtype=torch.float64).expand(K)
        dist = (x.double() - means.double()[k]).norm(dim=1)
        out["high_quality_fraction"] = float((dist <= quality_std * s[k]).double().mean())
    if labels is not None:
        out["class_accuracy"] = float((k == labels.to(k.device).long()).double().mean())
    return out


# ------------------------------------------------------------------------------------------------ the protocol
@dataclass
class ToyReference:
    """What every score of one protocol is measured against: exact sets ``a`` (compared with) and ``b``
    (the floor), their seeds, the SW2 directions, and the exact-vs-exact scores (the floor of each metric)."""

    samples: Tensor
    floor_samples: Tensor
    directions: Tensor
    seeds: tuple[int, int]
    projection_seed: int
    floor: dict[str, Any] = field(default_factory=dict)


def _truth(dataset: Any) -> dict[str, Any]:
    if not has_known_distribution(dataset):
        raise ValueError(
            f"dataset {getattr(dataset, 'name', type(dataset).__name__)} has no known distribution "
            "(needs exact_samples, true_mean, true_covariance)"
        )
    t: dict[str, Any] = {"mean": dataset.true_mean().float(), "cov": dataset.true_covariance().float()}
    if is_mixture(dataset):
        t.update(
            means=dataset.component_means.float(),
            stds=dataset.component_stds.float(),
            weights=dataset.component_weights.float(),
        )
    return t


def distribution_scores(
    x: Tensor,
    dataset: Any,
    reference: ToyReference,
    assignment: str = "nearest",
    coverage_fraction: float = 0.1,
    quality_std: float | None = 3.0,
    labels: Tensor | None = None,
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Scalar scores of samples ``x`` against ``dataset``'s truth, and (mixtures) the per-mode details."""
    t = _truth(dataset)
    x = x.reshape(len(x), -1).float().cpu()
    scores = gaussian_moment_errors(x, t["mean"], t["cov"])
    scores["sw2"] = sliced_w2(x, reference.samples, directions=reference.directions)
    modes = None
    if "means" in t:
        modes = mode_masses(
            x, t["means"], t["stds"], t["weights"], assignment, coverage_fraction, quality_std, labels=labels
        )
        scores.update({k: modes[k] for k in ("mass_error_max", "modes_covered")})
        scores.update({k: modes[k] for k in ("high_quality_fraction", "class_accuracy") if k in modes})
    return scores, modes


def toy_reference(
    dataset: Any,
    num_samples: int,
    num_projections: int = 128,
    projection_seed: int = 0,
    reference_seed: int = 1_000_000,
    assignment: str = "nearest",
    coverage_fraction: float = 0.1,
    quality_std: float | None = 3.0,
) -> ToyReference:
    """Two independent exact sets of ``num_samples`` (seeds ``reference_seed`` and ``reference_seed + 1``), the
    SW2 directions, and the floor: the scores of the second exact set (SW2 against the first)."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    _truth(dataset)  # a clear error for data without a known distribution
    seeds = (int(reference_seed), int(reference_seed) + 1)
    a = dataset.exact_samples(num_samples, torch.Generator().manual_seed(seeds[0])).reshape(num_samples, -1).float()
    b = dataset.exact_samples(num_samples, torch.Generator().manual_seed(seeds[1])).reshape(num_samples, -1).float()
    ref = ToyReference(a, b, random_directions(a.shape[1], num_projections, projection_seed), seeds, projection_seed)
    floor, _ = distribution_scores(b, dataset, ref, assignment, coverage_fraction, quality_std)
    ref.floor = floor
    return ref


@torch.no_grad()
def generate_samples(
    model: nn.Module,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 4096,
    spec: SamplerSpec | None = None,
    cond_fn: CondFn | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """``num_samples`` float samples (CPU), sample ``i`` seeded by ``seed + i`` (like ``iter_generate``, unquantised).

    The model is put in eval mode for the duration and restored afterwards.
    """
    spec = spec or sampler_spec(model)
    was_training = model.training
    model.eval()
    try:
        out = [
            sample_batch(model, torch.arange(lo, min(lo + batch_size, num_samples)), spec, seed, cond_fn, device)
            .float()
            .cpu()
            for lo in range(0, num_samples, batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out)


@dataclass
class ToyResult:
    """Scores of one model: flat scalars (``scores``), per-mode details of mixtures, and the protocol."""

    scores: dict[str, float]
    modes: dict[str, Any] | None
    protocol: dict[str, Any]
    sampler: dict[str, Any]
    seconds: float


def toy_protocol(
    dataset: Any,
    reference: ToyReference,
    num_samples: int,
    seed: int,
    assignment: str,
    coverage_fraction: float,
    quality_std: float | None,
    sampler: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to reproduce a toy score: samples, seeds, projections, the truth, the floor."""
    from diffdistill.evaluation.harness import _version

    name = getattr(dataset, "name", type(dataset).__name__)
    p: dict[str, Any] = {
        "metrics": list(reference.floor),
        "num_samples": int(num_samples),
        "num_images": int(num_samples),  # the key write_results / plot_results compare and show
        "seed_range": [int(seed), int(seed) + int(num_samples) - 1],
        "seeding": "sample i: torch.Generator().manual_seed(seed + i)",
        "extractor": {"extractor": "identity"},
        "reference": {"dataset": name, "split": "exact", "resolution": None},
        "distribution": {
            "dataset": name,
            "class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
            "sample_shape": list(reference.samples.shape[1:]),
        },
        "exact_samples": {
            "num_samples": int(num_samples),
            "seeds": list(reference.seeds),
            "drawn_by": "dataset.exact_samples(n, torch.Generator().manual_seed(seed)); the first set is the "
            "reference of every distance, the second gives the floor",
        },
        "sliced_w2": {
            "num_projections": int(reference.directions.shape[0]),
            "projection_seed": int(reference.projection_seed),
            "directions": "randn(P, d, generator=manual_seed(projection_seed)), rows normalised",
        },
        "moments": "mean_error = |mean - mu|_2; cov_error_fro = |cov - Sigma|_F; cov_error_rel = that / |Sigma|_F",
        "exact_vs_exact": dict(reference.floor),
        "sampler": sampler,
    }
    if is_mixture(dataset):
        p["modes"] = {
            "assignment": assignment,
            "num_modes": int(len(dataset.component_means)),
            "true_weights": [round(float(w), 6) for w in dataset.component_weights],
            "coverage_fraction": float(coverage_fraction),
            "covered": "mass_k >= coverage_fraction * weight_k",
            "quality_std": quality_std,
        }
    p["software"] = {"diffdistill": _version(), "torch": torch.__version__}
    return p


def evaluate_toy(
    generator: nn.Module,
    dataset: Any,
    num_samples: int = 16384,
    seed: int = 0,
    num_projections: int = 128,
    projection_seed: int = 0,
    reference_seed: int = 1_000_000,
    assignment: str = "nearest",
    coverage_fraction: float = 0.1,
    quality_std: float | None = 3.0,
    batch_size: int = 4096,
    sampler_steps: int | None = None,
    sigmas: list[float] | None = None,
    num_classes: int | str | None = "auto",
    device: str | torch.device = "cpu",
    reference: ToyReference | None = None,
) -> ToyResult:
    """Generate ``num_samples`` (sample ``i`` seeded by ``seed + i``) and score them against ``dataset``'s truth.

    ``reference`` (from :func:`toy_reference` with the same settings) is reused across models of one protocol;
    by default it is built here. Class-conditional models get labels ``i % num_classes``.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    if not (seed + num_samples <= reference_seed or seed > reference_seed + 1):
        raise ValueError(
            f"generated seeds {seed}..{seed + num_samples - 1} overlap the exact-sample seeds "
            f"{reference_seed}, {reference_seed + 1}: choose another reference_seed"
        )
    t0 = time.perf_counter()
    if reference is None:
        ref_opts = (num_projections, projection_seed, reference_seed, assignment, coverage_fraction, quality_std)
        reference = toy_reference(dataset, num_samples, *ref_opts)
    elif len(reference.samples) != num_samples:
        raise ValueError(f"the reference holds {len(reference.samples)} exact samples, not {num_samples}")
    spec = sampler_spec(generator, sampler_steps, sigmas)
    nc = getattr(generator, "num_classes", None) if num_classes == "auto" else num_classes
    cond_fn = class_conditioning(int(nc)) if nc else None
    x = generate_samples(generator, num_samples, seed, batch_size, spec, cond_fn, device)
    labels = torch.arange(num_samples) % int(nc) if nc else None
    nonfinite = int((~torch.isfinite(x.reshape(num_samples, -1))).any(1).sum())
    scores, modes = distribution_scores(x, dataset, reference, assignment, coverage_fraction, quality_std, labels)
    if nonfinite:
        scores["nonfinite_samples"] = nonfinite
    sampler = {**spec.protocol(), "num_classes": nc}
    protocol = toy_protocol(dataset, reference, num_samples, seed, assignment, coverage_fraction, quality_std, sampler)
    return ToyResult(scores, modes, protocol, sampler, time.perf_counter() - t0)
