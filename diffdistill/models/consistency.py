"""Consistency-model parametrisations over any :class:`Denoiser`.

* :class:`ConsistencyDenoiser`: the boundary-condition wrapper of Song et al. (2023), ``f(x, sigma_min) = x``.
* :class:`LCMBoundaryDenoiser`: LCM's boundary scalings on discrete VP timesteps (``timestep_scaling = 10``), as
  diffusers' ``LCMScheduler`` and LCM training scripts apply them to SD-family students.
* :func:`trigflow_F`: the TrigFlow network output ``F(x_t / sigma_d, t)`` of any EDM-convention denoiser (sCM).
* :class:`AdaptiveWeight`: sCM's learned per-time loss weight ``w_phi(t)`` (Lu & Song 2024, Eq. 9).
* :class:`AffineConsistencyDenoiser`: a two-parameter-per-dimension toy student whose family contains the exact
  consistency function of Gaussian data (docs/invariants.md §1), for fast ground-truth tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffdistill.conventions import (
    append_dims,
    consistency_precond,
    edm_precond,
    trig_to_edm,
    x0_to_trigflow_F,
)
from diffdistill.models.analytic import AffineDenoiser
from diffdistill.models.conditioning import Conditioning, as_conditioning
from diffdistill.models.denoiser import Denoiser, EDMDenoiser
from diffdistill.schedules.discrete import DDPMSchedule

LCM_SIGMA_DATA = 0.5  # diffusers LCMScheduler.get_scalings_for_boundary_condition_discrete
LCM_TIMESTEP_SCALING = 10.0  # LCMScheduler(timestep_scaling=10.0); the LCM scripts' --timestep_scaling_factor


class ConsistencyDenoiser(Denoiser):
    """Boundary-condition parametrisation ``f(x, sigma) = c_skip^b x + c_out^b F(c_in x, c_noise)``.

    Song et al., "Consistency Models" (arXiv:2303.01469), App. C: ``c_skip^b = sigma_d^2 / ((sigma -
    sigma_min)^2 + sigma_d^2)`` and ``c_out^b = (sigma - sigma_min) sigma_d / sqrt(sigma^2 + sigma_d^2)``, hence
    ``f(x, sigma_min) = x`` exactly. For an :class:`EDMDenoiser` the raw network ``F`` is called directly (its
    parameters are shared, no copy); any other denoiser is read through ``F = (D - c_skip x) / c_out``.

    Args:
        inner: the wrapped denoiser (its parameters are this module's parameters).
        sigma_min: the boundary (default: ``inner.sigma_min``).
    """

    def __init__(self, inner: Denoiser, sigma_min: float | None = None):
        super().__init__()
        self.inner = inner
        self.sigma_data = float(inner.sigma_data)
        self.sigma_min = float(inner.sigma_min if sigma_min is None else sigma_min)
        self.sigma_max = float(inner.sigma_max)
        self.num_classes = getattr(inner, "num_classes", None)
        self.has_null_class = getattr(inner, "has_null_class", True)

    @property
    def null_prompt(self) -> Conditioning | None:
        return self.inner.null_prompt

    def prior_std(self, sigma: float) -> float:
        return self.inner.prior_std(sigma)

    @property
    def boundary_sigma(self) -> float:
        return self.sigma_min

    def to_config(self) -> dict:
        from diffdistill.models.io import model_config

        return {
            "_target_": "diffdistill.models.consistency.ConsistencyDenoiser",
            "inner": model_config(self.inner),
            "sigma_min": self.sigma_min,
        }

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inner.sample_shape)

    def raw_output(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """The network output ``F`` in the EDM preconditioning of the wrapped denoiser."""
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        if isinstance(self.inner, EDMDenoiser) and self.inner.sigma_data == self.sigma_data:
            return self.inner.net(append_dims(c_in, x.ndim) * x, c_noise, cond).to(x.dtype)
        x0_hat = self.inner(x, sigma, cond)
        return (x0_hat - append_dims(c_skip, x.ndim) * x) / append_dims(c_out, x.ndim)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        c_skip, c_out = consistency_precond(sigma, self.sigma_data, self.sigma_min)
        F = self.raw_output(x, sigma, cond)
        # (Song et al. 2023, Eq. 5) f = c_skip^b x + c_out^b F
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * F

    def features(self, x, sigma, cond=None):
        return self.inner.features(x, sigma, cond)


def lcm_boundary_scalings(
    t: Tensor, sigma_data: float = LCM_SIGMA_DATA, timestep_scaling: float = LCM_TIMESTEP_SCALING
) -> tuple[Tensor, Tensor]:
    """LCM's ``(c_skip, c_out)`` at discrete timestep ``t`` (diffusers ``scheduling_lcm.py``,
    ``get_scalings_for_boundary_condition_discrete``): with ``u = timestep_scaling t``,
    ``c_skip = sigma_d^2 / (u^2 + sigma_d^2)`` and ``c_out = u / sqrt(u^2 + sigma_d^2)``; ``(1, 0)`` at ``t = 0``."""
    u = timestep_scaling * t
    c_skip = sigma_data**2 / (u**2 + sigma_data**2)
    c_out = u / (u**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def discrete_vp_schedule(module: nn.Module | None) -> DDPMSchedule | None:
    """The DDPM schedule of a VP discrete-time adapter (``DiffusersVPDenoiser``, ``DiffusersSDDenoiser``) found in
    ``module`` (a generator, teacher or denoiser, through LoRA views and wrappers); ``None`` for other networks."""
    if module is None:
        return None
    for m in module.modules():
        schedule = getattr(m, "schedule", None)
        if isinstance(schedule, DDPMSchedule):
            return schedule
        shared = getattr(m, "shared", None)  # a LoRA teacher view keeps its network outside _modules
        if isinstance(shared, nn.Module) and shared is not m and (found := discrete_vp_schedule(shared)) is not None:
            return found
    return None


class LCMBoundaryDenoiser(Denoiser):
    """LCM's boundary parametrisation over a VP discrete-time adapter, in the EDM view.

    Luo et al., "Latent Consistency Models" (arXiv:2310.04378), Eq. 8, as diffusers applies it (``LCMScheduler.step``
    and ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``): with ``t`` the (fractional) DDPM
    timestep of ``sigma``, ``x_vp = alpha_t x`` the VP sample and ``x0_hat`` the wrapped adapter's prediction,
    ``f = c_skip(t) x_vp + c_out(t) x0_hat`` (:func:`lcm_boundary_scalings`, ``sigma_data = 0.5``,
    ``timestep_scaling = 10``). ``f`` is an estimate of ``x0``, the same quantity in the VP and EDM views, so it is
    returned as is. At ``t = 19`` this is ``x0_hat`` up to ``7e-6 x_vp``; at ``t = 0`` it is ``x_vp``, the
    training script's target at its clamped last timestep; as ``sigma -> 0``, ``f -> x``.

    ``boundary_sigma`` is 0: the multistep sampler then re-noises ``x0`` to the full next sigma, as
    ``LCMScheduler.step`` does (``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps``), not to Song et al.'s
    ``sqrt(sigma^2 - sigma_min^2)``.

    Args:
        inner: a VP discrete-time adapter (has a :class:`~diffdistill.schedules.discrete.DDPMSchedule` ``schedule``);
            its parameters are this module's parameters.
        sigma_data, timestep_scaling: LCM's constants (0.5, 10).
    """

    def __init__(
        self, inner: Denoiser, sigma_data: float = LCM_SIGMA_DATA, timestep_scaling: float = LCM_TIMESTEP_SCALING
    ):
        super().__init__()
        if not isinstance(getattr(inner, "schedule", None), DDPMSchedule):
            raise ValueError(
                f"LCM's discrete boundary scalings need a VP discrete-time adapter with a DDPM schedule "
                f"(DiffusersSDDenoiser, DiffusersVPDenoiser), got {type(inner).__name__}; use ConsistencyDenoiser"
            )
        self.inner = inner
        self.lcm_sigma_data, self.timestep_scaling = float(sigma_data), float(timestep_scaling)
        self.sigma_data = float(inner.sigma_data)
        self.sigma_min, self.sigma_max = float(inner.sigma_min), float(inner.sigma_max)
        self.num_classes = getattr(inner, "num_classes", None)
        self.has_null_class = getattr(inner, "has_null_class", True)

    @property
    def schedule(self) -> DDPMSchedule:
        return self.inner.schedule

    @property
    def boundary_sigma(self) -> float:
        return 0.0

    @property
    def null_prompt(self) -> Conditioning | None:
        return self.inner.null_prompt

    def prior_std(self, sigma):
        return self.inner.prior_std(sigma)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inner.sample_shape)

    def to_config(self) -> dict:
        from diffdistill.models.io import model_config

        return {
            "_target_": "diffdistill.models.consistency.LCMBoundaryDenoiser",
            "inner": model_config(self.inner),
            "sigma_data": self.lcm_sigma_data,
            "timestep_scaling": self.timestep_scaling,
        }

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, alpha)`` at ``sigma`` ``[B]``: LCM's scalings at its timestep and ``alpha = 1/sqrt(1 +
        sigma^2)`` (``x_vp = alpha x``)."""
        t = self.schedule.sigma_to_t(sigma).to(sigma.device, torch.float32)
        c_skip, c_out = lcm_boundary_scalings(t, self.lcm_sigma_data, self.timestep_scaling)
        alpha, _ = self.schedule.alpha_sigma(sigma)
        return c_skip.to(sigma.dtype), c_out.to(sigma.dtype), alpha

    def denoise(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        x0_hat = self.inner(x, sigma, cond)
        c_skip, c_out, alpha = self.scalings(sigma)
        # (LCM Eq. 8; diffusers scheduling_lcm.py step: denoised = c_out * x0_pred + c_skip * sample)
        return append_dims(c_skip * alpha, x.ndim).to(x.dtype) * x + append_dims(c_out, x.ndim).to(x.dtype) * x0_hat

    def features(self, x, sigma, cond=None):
        return self.inner.features(x, sigma, cond)


def has_boundary_condition(denoiser: nn.Module) -> bool:
    """Whether ``denoiser`` already satisfies ``f(x, sigma_b) = x`` at some boundary ``sigma_b``."""
    return getattr(denoiser, "boundary_sigma", None) is not None


def wrap_boundary_condition(generator: nn.Module, sigma_min: float, kind: str = "auto") -> nn.Module:
    """Replace ``generator.denoiser`` by a boundary-condition wrapper (in place, parameters unchanged):
    ``kind="song"`` a :class:`ConsistencyDenoiser` with boundary ``sigma_min``, ``kind="lcm"`` an
    :class:`LCMBoundaryDenoiser` (LCM's discrete-timestep scalings; ``sigma_min`` unused). ``"auto"``: LCM's for a
    VP discrete-time network (SD-family and DDPM adapters: the parametrisation of diffusers' ``LCMScheduler``, so the
    student exports to a stock pipeline), Song's for every other.

    Does nothing when the denoiser already has a boundary condition. Parameter objects are kept, so an
    optimiser built before or after this call sees the same tensors; state-dict keys gain an ``inner.`` level.
    """
    if kind not in ("auto", "song", "lcm"):
        raise ValueError(f"boundary condition kind must be 'auto', 'song' or 'lcm', got {kind!r}")
    if kind == "auto":
        kind = "lcm" if discrete_vp_schedule(generator.denoiser) is not None else "song"
    if not has_boundary_condition(generator.denoiser):
        wrapper = LCMBoundaryDenoiser if kind == "lcm" else lambda d: ConsistencyDenoiser(d, sigma_min)
        generator.denoiser = wrapper(generator.denoiser)
    return generator


def trigflow_F(
    denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning | None, sigma_data: float, **kwargs
) -> Tensor:
    """TrigFlow output ``F(x_t / sigma_d, t)`` of an EDM-convention denoiser (Lu & Song 2024, Eq. 6).

    With ``x = x_t / cos t`` and ``sigma = sigma_d tan t`` (:func:`~diffdistill.conventions.trig_to_edm`), EDM's
    ``c_in x = x_t / sigma_d``, ``c_skip = cos^2 t`` and ``c_out = sigma_d sin t``, so an EDM-preconditioned
    network *is* a TrigFlow network with ``F_trig = -F_edm`` and time input ``c_noise = ln(sigma_d tan t) / 4``.
    That path is used for an :class:`EDMDenoiser` (or a ``Generator`` holding one); anything else (a
    :class:`~diffdistill.models.teacher.Teacher`, whose CFG ``kwargs`` are passed on, an analytic denoiser, a
    :class:`ConsistencyDenoiser`) goes through ``x0_hat``.
    """
    from diffdistill.models.generator import Generator

    cond = as_conditioning(cond)
    den = denoiser.denoiser if isinstance(denoiser, Generator) else denoiser
    x, sigma = trig_to_edm(x_t, t, sigma_data)
    if isinstance(den, EDMDenoiser) and den.sigma_data == sigma_data:
        _, _, _, c_noise = edm_precond(sigma, sigma_data)
        return -den.net(x_t / sigma_data, c_noise, cond).to(x_t.dtype)
    x0_hat = den(x, sigma, cond, **kwargs)
    return x0_to_trigflow_F(x_t, x0_hat, t, sigma_data)


class AdaptiveWeight(nn.Module):
    """sCM's adaptive loss weight ``w_phi(t)`` as ``logvar = -w_phi``: fixed Fourier features of
    ``c_noise = ln(sigma_d tan t) / 4`` and a zero-initialised linear head (Lu & Song 2024, Eq. 9; EDM2's
    uncertainty weighting, Karras et al. 2024).
    """

    def __init__(self, channels: int = 128, scale: float = 1.0, sigma_data: float = 0.5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", torch.randn(channels // 2, generator=g) * scale)
        self.register_buffer("phases", torch.rand(channels // 2, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.sigma_data, self.channels, self.scale = float(sigma_data), int(channels), float(scale)

    def to_config(self) -> dict:
        return {
            "_target_": "diffdistill.models.consistency.AdaptiveWeight",
            "channels": self.channels,
            "scale": self.scale,
            "sigma_data": self.sigma_data,
        }

    def forward(self, t: Tensor) -> Tensor:
        """``logvar(t)``, shape ``[B]``."""
        c_noise = (self.sigma_data * torch.tan(t)).log() / 4.0
        h = 2 * math.pi * (c_noise[:, None].float() * self.freqs[None] + self.phases[None])
        return self.linear(torch.cat([h.cos(), h.sin()], dim=1) / math.sqrt(self.freqs.numel())).squeeze(1)


class AffineConsistencyDenoiser(AffineDenoiser):
    """Toy consistency student ``f(x, sigma) = b + sqrt((a^2 + sigma_b^2) / (a^2 + sigma^2)) (x - b)``.

    For data ``N(mu, s^2)`` per dimension the exact consistency function with boundary ``sigma_b`` is this family
    at ``a = s``, ``b = mu`` (docs/invariants.md §1), so objectives can be checked against ground truth in a few
    hundred steps. ``f(x, sigma_b) = x`` (up to rounding). ``sigma_b = 0`` is the boundary of ECT and sCM.
    """

    def __init__(
        self,
        dim: int = 16,
        a_init: float = 0.3,
        b_init: float = -0.2,
        boundary_sigma: float = 0.002,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ):
        super().__init__(dim, a_init, b_init, float(sigma_data), float(sigma_min), float(sigma_max))
        self._boundary = float(boundary_sigma)

    def to_config(self) -> dict:
        return {
            **super().to_config(),
            "_target_": "diffdistill.models.consistency.AffineConsistencyDenoiser",
            "boundary_sigma": self._boundary,
        }

    @property
    def boundary_sigma(self) -> float:
        return self._boundary

    def denoise(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        a2 = self.a**2
        s2 = append_dims(sigma, x.ndim) ** 2
        return self.b + ((a2 + self._boundary**2) / (a2 + s2)).sqrt() * (x - self.b)
