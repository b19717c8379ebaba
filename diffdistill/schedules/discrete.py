"""DDPM discrete-time schedules seen through the EDM sigma (``sigma_t = sqrt((1 - abar_t) / abar_t)``)."""

from __future__ import annotations

import torch
from torch import Tensor


class DDPMSchedule:
    """Maps between DDPM timesteps and EDM sigma.

    Args:
        alphas_cumprod: ``abar_t`` for ``t = 0..T-1`` (as diffusers schedulers expose it).
        quantize: round continuous timesteps to the nearest integer (SD teachers were trained on
            integer timesteps only).
    """

    def __init__(self, alphas_cumprod: Tensor, quantize: bool = False) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or not (ac[1:] <= ac[:-1]).all():
            raise ValueError("alphas_cumprod must be a 1-d non-increasing sequence")
        self.alphas_cumprod = ac
        self.sigmas = ((1 - ac) / ac).sqrt()  # ascending in t
        self.log_sigmas = self.sigmas.log()
        self.quantize = quantize
        self._on_device: dict[torch.device, Tensor] = {}

    def _log_sigmas(self, device: torch.device) -> Tensor:
        """``log_sigmas`` on ``device`` (copied once per device: no host round trip, hence no sync, per call)."""
        if device.type == "cpu":
            return self.log_sigmas
        if device not in self._on_device:
            self._on_device[device] = self.log_sigmas.to(device)
        return self._on_device[device]

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, **kw) -> DDPMSchedule:
        """Stable Diffusion's ``scaled_linear`` beta schedule, computed as diffusers' ``DDPMScheduler`` does (float32
        betas and products), so its sigmas are the pipelines' to the last bit."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0), **kw)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02, **kw) -> DDPMSchedule:
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, 0), **kw)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Timestep (possibly fractional) -> sigma, interpolating ``log sigma`` linearly."""
        t = t.double().clamp(0, len(self.sigmas) - 1).cpu()
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(self.sigmas) - 1)
        w = t - lo
        log_s = (1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]
        return log_s.exp().float()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Sigma -> fractional timestep (inverse of :meth:`t_to_sigma`), rounded if ``quantize``."""
        log_sigmas = self._log_sigmas(sigma.device)
        log_s = sigma.double().log().clamp(float(self.log_sigmas[0]), float(self.log_sigmas[-1]))
        idx = torch.searchsorted(log_sigmas, log_s).clamp(1, len(self.sigmas) - 1)
        lo_s, hi_s = log_sigmas[idx - 1], log_sigmas[idx]
        w = (log_s - lo_s) / (hi_s - lo_s)
        t = (idx - 1).double() + w
        if self.quantize:
            t = t.round()
        return t.float()

    def alpha_sigma(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """VP coefficients ``(alpha, s)`` of an EDM sigma: ``alpha = 1/sqrt(1+sigma^2)``, ``s = sigma alpha``."""
        alpha = (1 + sigma**2).rsqrt()
        return alpha, sigma * alpha
