"""Samplers over any denoiser ``D(x, sigma, cond)`` (k-diffusion style, EDM convention).

* :func:`heun_sample`: EDM's deterministic 2nd-order sampler (Karras et al. 2022, Alg. 1).
* :func:`euler_sample`: 1st-order probability-flow ODE.
* :func:`multistep_sample`: consistency multistep sampling (Song et al. 2023, Alg. 1): denoise, re-noise
  to the next sigma with fresh noise, denoise...
* :func:`tcd_sample`: TCD's gamma sampling (Zheng et al. 2024): denoise to ``x0``, move along the
  deterministic path to ``sigma_s = (1 - gamma) sigma_next`` and inject fresh noise up to ``sigma_next``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffdistill.conventions import as_sigma
from diffdistill.models.conditioning import Conditioning

DenoiseFn = Callable[[Tensor, Tensor, Conditioning | None], Tensor]


def _d(fn: DenoiseFn, x: Tensor, sigma: Tensor | float, cond) -> Tensor:
    return fn(x, as_sigma(sigma, x.shape[0], x.device), cond)


@torch.no_grad()
def heun_sample(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, cond: Conditioning | None = None) -> Tensor:
    """Integrate the PF-ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` from ``sigmas[0]`` to the last entry.

    ``x`` must already be scaled to ``sigmas[0]`` (``x = sigma_max * z``); a trailing 0 in ``sigmas`` makes
    the last step Euler (Alg. 1).
    """
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - _d(denoise, x, s, cond)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:  # (Alg. 1, l. 7) second-order correction
            d2 = (x_next - _d(denoise, x_next, s_next, cond)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
    return x


@torch.no_grad()
def euler_sample(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, cond: Conditioning | None = None) -> Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x = x + (s_next - s) * (x - _d(denoise, x, s, cond)) / s
    return x


def multistep_sample(
    denoise: DenoiseFn,
    z: Tensor,
    sigmas: list[float] | Tensor,
    cond: Conditioning | None = None,
    generator: torch.Generator | None = None,
    noise: list[Tensor] | None = None,
    sigma_min: float = 0.0,
    prior_std: float | None = None,
) -> Tensor:
    """Consistency multistep sampling (Song et al. 2023, Alg. 1): ``x0 = D(sigma_0 z)``; for each next sigma
    ``x0 = D(x0 + sqrt(sigma^2 - sigma_min^2) eps, sigma)``. ``sigma_min`` is the student's boundary (the noise a
    boundary-condition student's ``x0`` already carries); 0 for students without one. ``prior_std`` replaces
    ``sigma_0`` as the scale of ``z`` (``Denoiser.prior_std``: unit noise in a VP or flow model's native space)."""
    sigmas = [float(s) for s in sigmas]
    x0 = _d(denoise, (sigmas[0] if prior_std is None else prior_std) * z, sigmas[0], cond)
    for i, s in enumerate(sigmas[1:]):
        eps = (
            noise[i] if noise is not None else torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        )
        # (Song et al. 2023, Alg. 1, line 5)
        x0 = _d(denoise, x0 + math.sqrt(max(s * s - sigma_min * sigma_min, 0.0)) * eps, s, cond)
    return x0


def tcd_sample(
    denoise: DenoiseFn,
    z: Tensor,
    sigmas: list[float] | Tensor,
    gamma: float = 0.3,
    cond: Conditioning | None = None,
    generator: torch.Generator | None = None,
    prior_std: float | None = None,
) -> Tensor:
    """TCD's strategic stochastic sampling; ``gamma = 0`` is deterministic DDIM-like, ``gamma = 1`` is multistep CM.
    ``prior_std``: as in :func:`multistep_sample`."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    sigmas = [float(s) for s in sigmas]
    x = (sigmas[0] if prior_std is None else prior_std) * z
    x0 = _d(denoise, x, sigmas[0], cond)
    for i, s_next in enumerate(sigmas[1:]):
        s = sigmas[i]
        s_mid = (1.0 - gamma) * s_next
        # deterministic move to sigma_mid along the line through (x, x0), then fresh noise up to sigma_next
        x = x0 + (s_mid / s) * (x - x0)
        if s_next > s_mid:
            eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            x = x + (s_next**2 - s_mid**2) ** 0.5 * eps
        x0 = _d(denoise, x, s_next, cond)
    return x0
