"""Rectified-flow time ``u`` <-> EDM sigma, with the SD3 resolution shift."""

from __future__ import annotations

from torch import Tensor


def u_to_sigma(u: Tensor) -> Tensor:
    """``x_u = (1-u) x0 + u eps`` is ``x0 + sigma eps`` scaled by ``1-u`` with ``sigma = u/(1-u)``."""
    return u / (1 - u)


def sigma_to_u(sigma: Tensor) -> Tensor:
    return sigma / (1 + sigma)


def flow_shift(u: Tensor, shift: float = 1.0) -> Tensor:
    """SD3 / Flux time shift ``u' = s u / (1 + (s - 1) u)`` (Esser et al. 2024, Eq. 23); ``s = 1`` is identity."""
    return shift * u / (1 + (shift - 1) * u)


def flow_unshift(u: Tensor, shift: float = 1.0) -> Tensor:
    """Inverse of :func:`flow_shift`."""
    return u / (shift - (shift - 1) * u)
