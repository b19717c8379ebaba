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


def shift_sigma(sigma: Tensor, shift: float = 1.0) -> Tensor:
    """:func:`flow_shift` in the EDM view: ``u' = s u / (1 + (s-1) u)`` is exactly ``sigma' = s sigma``.

    (``sigma' = u' / (1 - u') = s u / (1 - u) = s sigma``.) So the SD3 / Flux shift multiplies every EDM noise level
    by ``s``: a sampler grid or a training density of sigma is shifted by scaling it, the network call is unchanged.
    """
    return shift * sigma


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent ``mu``: linear in the number of image tokens through ``(base_seq_len,
    base_shift)`` and ``(max_seq_len, max_shift)`` (diffusers ``pipelines/flux/pipeline_flux.py``
    ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def dynamic_shift_factor(mu: float, time_shift_type: str = "exponential") -> float:
    """The static shift ``s`` that the dynamic shift ``mu`` amounts to.

    ``FlowMatchEulerDiscreteScheduler.time_shift`` maps ``t -> e^mu / (e^mu + (1/t - 1))`` (exponential) or
    ``mu / (mu + (1/t - 1))`` (linear); both are :func:`flow_shift` with ``s = e^mu`` resp. ``s = mu``.
    """
    import math

    if time_shift_type == "exponential":
        return math.exp(mu)
    if time_shift_type == "linear":
        return float(mu)
    raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got '{time_shift_type}'")


def logit_normal_as_lognormal(shift: float = 1.0, m: float = 0.0, s: float = 1.0) -> tuple[float, float]:
    """SD3's training density in EDM terms: ``(P_mean, P_std)`` of the log-normal ``ln sigma ~ N(P_mean, P_std^2)``.

    SD3 trains on ``u = sigmoid(m + s n)``, ``n ~ N(0, 1)`` (Esser et al. 2024, §3.1, logit-normal sampling;
    ``m = 0, s = 1``), then shifted (§5.3.2). Since ``sigma = u / (1-u) = exp(logit u)``, logit-normal ``u`` is
    log-normal ``sigma`` with ``ln sigma = m + s n``, and the shift multiplies sigma by ``shift``
    (:func:`shift_sigma`): so an EDM log-normal sampler with ``P_mean = m + ln(shift)``, ``P_std = s`` draws exactly
    the teacher's training noise levels.
    """
    import math

    return m + math.log(shift), s
