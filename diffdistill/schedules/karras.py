"""Karras et al. (2022) discretisation and sigma training densities."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def karras_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, append_zero: bool = False
) -> Tensor:
    """Descending Karras grid ``sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho`` (Eq. 5)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        sigmas = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.float()


class SigmaSampler:
    """A training density over sigma: ``sampler(batch, device, generator) -> [B]`` float32."""

    def __call__(
        self, batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> Tensor:
        raise NotImplementedError


@dataclass
class LogNormalSigma(SigmaSampler):
    """EDM training density ``ln sigma ~ N(P_mean, P_std^2)`` (Karras et al. 2022, Table 1)."""

    P_mean: float = -1.2
    P_std: float = 1.2

    def __call__(self, batch, device="cpu", generator=None):
        n = torch.randn(batch, device=device, generator=generator)
        return (self.P_mean + self.P_std * n).exp()

    def log_prob(self, sigma: Tensor) -> Tensor:
        """Density of ``sigma`` itself (change of variables from ``ln sigma``)."""
        z = (sigma.log() - self.P_mean) / self.P_std
        return -0.5 * z**2 - math.log(self.P_std * math.sqrt(2 * math.pi)) - sigma.log()


@dataclass
class LogUniformSigma(SigmaSampler):
    """``ln sigma ~ U(ln sigma_min, ln sigma_max)``."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __call__(self, batch, device="cpu", generator=None):
        u = torch.rand(batch, device=device, generator=generator)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return (lo + u * (hi - lo)).exp()

    def log_prob(self, sigma: Tensor) -> Tensor:
        return -sigma.log() - math.log(math.log(self.sigma_max) - math.log(self.sigma_min))


@dataclass
class KarrasSchedule:
    """The Karras noise range and discretisation that objectives index into.

    Args:
        sigma_min, sigma_max, rho: the grid of Eq. 5 of Karras et al. (2022).
        num_scales: default number of grid points (DMD2 indexes a 1000-level grid; CD uses N = 18/40).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    num_scales: int = 1000

    def sigmas(self, n: int | None = None, ascending: bool = False) -> Tensor:
        s = karras_sigmas(n or self.num_scales, self.sigma_min, self.sigma_max, self.rho)
        return s.flip(0) if ascending else s
