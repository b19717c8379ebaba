"""The one statement of diffdistill's noise convention (EDM, Karras et al. 2022).

Inside diffdistill a noisy sample is ``x = x0 + sigma * eps`` in *unscaled* space, ``sigma`` is a
float32 tensor of shape ``[B]`` and every network role is a denoiser ``D(x, sigma, cond) -> x0_hat``.

Teachers with other parametrisations are converted at the edge with the maps below (docs/architecture.md §1):

| family            | native sample                 | EDM view                                   |
|-------------------|-------------------------------|--------------------------------------------|
| VE / EDM          | ``x0 + sigma eps``            | identity                                   |
| VP / DDPM         | ``alpha x0 + s eps``          | ``x = x_vp / alpha``, ``sigma = s / alpha`` |
| rectified flow    | ``(1-u) x0 + u eps``          | ``x = x_rf / (1-u)``, ``sigma = u / (1-u)`` |
| TrigFlow (sCM)    | ``cos t x0 + sin t z``        | ``x = x_trig / cos t``, ``sigma = sigma_d tan t`` |

No other module defines a parametrisation; everything imports from here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "PAPER_SIGMA_DATA",
    "noise_scale",
    "append_dims",
    "as_sigma",
    "edm_precond",
    "eps_to_x0",
    "x0_to_eps",
    "v_to_x0",
    "x0_to_v",
    "flow_to_x0",
    "x0_to_flow",
    "score_from_x0",
    "x0_from_score",
    "vp_to_edm",
    "edm_to_vp",
    "rf_to_edm",
    "edm_to_rf",
    "trig_to_edm",
    "edm_to_trig",
    "trigflow_F_to_x0",
    "x0_to_trigflow_F",
    "cfg_combine",
    "consistency_precond",
]


PAPER_SIGMA_DATA = 0.5
"""The data scale the papers' noise densities and ranges are stated for (pixels in ``[-1, 1]``)."""


def noise_scale(sigma_data: float, match: bool = True) -> float:
    """``c = sigma_data / 0.5``: the factor that carries a paper's noise density to data of scale ``sigma_data``.

    Rescaling data of scale ``sigma_data`` by ``1 / c`` gives the papers' ``sigma_data = 0.5``, and maps a noise
    level ``sigma`` to ``sigma / c``. So a density stated for 0.5 is used at ``sigma_data`` by scaling every
    noise level by ``c``: a log-normal ``ln sigma ~ N(P_mean, P_std^2)`` becomes ``N(P_mean + ln c, P_std^2)`` and
    a range ``[sigma_min, sigma_max]`` becomes ``[c sigma_min, c sigma_max]``. ``c = 1`` (the papers' values
    exactly) at ``sigma_data = 0.5`` or when ``match`` is off.
    """
    sigma_data = float(sigma_data)
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    return sigma_data / PAPER_SIGMA_DATA if match else 1.0


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a ``[B]`` tensor broadcasts against an ``ndim`` tensor."""
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a {v.ndim}-d tensor to {ndim} dims")
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))


def as_sigma(sigma: Tensor | float, batch: int, device: torch.device | None = None) -> Tensor:
    """Return ``sigma`` as a float32 ``[B]`` tensor (the only legal form inside diffdistill)."""
    if not torch.is_tensor(sigma):
        return torch.full((batch,), float(sigma), dtype=torch.float32, device=device)
    sigma = sigma.to(dtype=torch.float32, device=device or sigma.device)
    if sigma.ndim == 0:
        return sigma.expand(batch).clone()
    sigma = sigma.reshape(-1)
    if sigma.shape[0] != batch:
        raise ValueError(f"sigma has {sigma.shape[0]} entries but the batch has {batch} samples")
    return sigma


# ---------------------------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1)


def edm_precond(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``(c_skip, c_out, c_in, c_noise)`` of EDM for a ``[B]`` sigma."""
    s2, sd2 = sigma**2, sigma_data**2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / (s2 + sd2).sqrt()
    c_in = 1.0 / (s2 + sd2).sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


# ---------------------------------------------------------------------------------------------
# Prediction-space conversions in the EDM view (x = x0 + sigma eps)


def eps_to_x0(x: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    return x - append_dims(sigma, x.ndim) * eps


def x0_to_eps(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    return (x - x0) / append_dims(sigma, x.ndim)


def score_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie: ``grad log p_sigma(x) = (x0_hat - x) / sigma^2``."""
    return (x0 - x) / append_dims(sigma, x.ndim) ** 2


def x0_from_score(x: Tensor, score: Tensor, sigma: Tensor) -> Tensor:
    return x + append_dims(sigma, x.ndim) ** 2 * score


def v_to_x0(x_vp: Tensor, v: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
    """v-prediction (Salimans & Ho 2022) in VP space: ``x0 = alpha x_t - s v`` (alpha^2 + s^2 = 1)."""
    a, s = append_dims(alpha, x_vp.ndim), append_dims(s, x_vp.ndim)
    return a * x_vp - s * v


def x0_to_v(x_vp: Tensor, x0: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
    a, s = append_dims(alpha, x_vp.ndim), append_dims(s, x_vp.ndim)
    return (a * x_vp - x0) / s


def flow_to_x0(x_rf: Tensor, velocity: Tensor, u: Tensor) -> Tensor:
    """Rectified flow ``x_u = (1-u) x0 + u eps`` with velocity ``eps - x0``: ``x0 = x_u - u v``."""
    return x_rf - append_dims(u, x_rf.ndim) * velocity


def x0_to_flow(x_rf: Tensor, x0: Tensor, u: Tensor) -> Tensor:
    return (x_rf - x0) / append_dims(u, x_rf.ndim)


def trigflow_F_to_x0(x_trig: Tensor, F: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow: ``x0_hat = cos t x_t - sigma_d sin t F`` (Lu & Song 2024, Eq. 6)."""
    t = append_dims(t, x_trig.ndim)
    return torch.cos(t) * x_trig - sigma_data * torch.sin(t) * F


def x0_to_trigflow_F(x_trig: Tensor, x0: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    t = append_dims(t, x_trig.ndim)
    return (torch.cos(t) * x_trig - x0) / (sigma_data * torch.sin(t))


# ---------------------------------------------------------------------------------------------
# Sample-space maps between families and the EDM view


def vp_to_edm(x_vp: Tensor, alpha: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """``x_vp = alpha x0 + s eps``  ->  ``(x = x_vp / alpha, sigma = s / alpha)``."""
    return x_vp / append_dims(alpha, x_vp.ndim), s / alpha


def edm_to_vp(x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """EDM ``(x, sigma)`` -> ``(x_vp, alpha, s)`` with ``alpha = 1/sqrt(1+sigma^2)``."""
    alpha = 1.0 / (1.0 + sigma**2).sqrt()
    s = sigma * alpha
    return x * append_dims(alpha, x.ndim), alpha, s


def rf_to_edm(x_rf: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``x_rf = (1-u) x0 + u eps`` -> ``(x = x_rf/(1-u), sigma = u/(1-u))``."""
    return x_rf / append_dims(1.0 - u, x_rf.ndim), u / (1.0 - u)


def edm_to_rf(x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """EDM ``(x, sigma)`` -> ``(x_rf, u)`` with ``u = sigma / (1 + sigma)``; ``x_rf = (1-u) x`` is computed as
    ``x / (1 + sigma)`` (no cancellation in ``1 - u`` as ``u -> 1``)."""
    u = sigma / (1.0 + sigma)
    return x / append_dims(1.0 + sigma, x.ndim), u


def trig_to_edm(x_trig: Tensor, t: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """TrigFlow ``x_t = cos t x0 + sin t z`` -> ``(x = x_t / cos t, sigma = sigma_d tan t)``."""
    return x_trig / append_dims(torch.cos(t), x_trig.ndim), sigma_data * torch.tan(t)


def edm_to_trig(x: Tensor, sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """EDM ``(x, sigma)`` -> TrigFlow ``(x_t, t)`` with ``t = arctan(sigma / sigma_d)``."""
    t = torch.atan(sigma / sigma_data)
    return x * append_dims(torch.cos(t), x.ndim), t


def cfg_combine(x0_uncond: Tensor, x0_cond: Tensor, w: Tensor | float) -> Tensor:
    """Classifier-free guidance ``x0_u + w (x0_c - x0_u)``; ``w = 1`` means no guidance."""
    if torch.is_tensor(w) and w.ndim == 1:
        w = append_dims(w, x0_cond.ndim)
    return x0_uncond + w * (x0_cond - x0_uncond)


PI_2 = math.pi / 2


def consistency_precond(sigma: Tensor, sigma_data: float, sigma_min: float) -> tuple[Tensor, Tensor]:
    """Boundary-condition scalings of consistency models (Song et al. 2023, App. C; ``openai/consistency_models``).

    ``c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2)``, ``c_out = (sigma - sigma_min) sigma_d /
    sqrt(sigma^2 + sigma_d^2)`` (the denominator of ``c_out`` uses ``sigma``, not ``sigma - sigma_min``), so
    ``f(x, sigma_min) = x`` exactly.
    """
    d = sigma - sigma_min
    c_skip = sigma_data**2 / (d**2 + sigma_data**2)
    c_out = d * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out
