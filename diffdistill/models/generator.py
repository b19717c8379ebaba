"""The student: a trainable denoiser used as a one-step or few-step generator."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import torch
from torch import Tensor, nn

from diffdistill.conventions import as_sigma
from diffdistill.models.conditioning import Conditioning, as_conditioning
from diffdistill.models.denoiser import Denoiser, WrapsDenoiser
from diffdistill.sampling import multistep_sample, tcd_sample

INPUT_NOISE = ("prior", "sigma")


def trainable_copy(teacher: nn.Module) -> Denoiser:
    """A trainable deep copy of the teacher's denoiser (analytic denoisers provide ``trainable_copy``)."""
    den = getattr(teacher, "denoiser", teacher)
    if hasattr(den, "trainable_copy"):
        return den.trainable_copy().train()
    return copy.deepcopy(den).requires_grad_(True).train()


class Generator(WrapsDenoiser, nn.Module):
    """One step: ``x0 = D(sigma_init z, sigma_init, cond)``; few steps: :meth:`sample` over a sigma list.

    Args:
        denoiser: the trainable denoiser (usually a deep copy of the teacher's).
        sigma_init: the noise level of the one-step input (80 for EDM teachers, 2.5 for SiD).
        sampling_sigmas: the default few-step sigma list (``[sigma_init]`` = one step).
        guidance: ``{w_min, w_max, w_default}`` of a guidance-embedded student (see :meth:`set_guidance`).
        adaptive_weight: sCM's learned loss weight, saved with the student.
        input_noise: the scale of unit noise ``z`` at the first sigma: ``"prior"`` (``Denoiser.prior_std(sigma) z``:
            ``sigma z`` for EDM networks, unit noise in a VP / flow model's native space, ``x_vp = z``; what stock
            pipelines start from) or ``"sigma"`` (``sigma z`` for every network: on a VP teacher ``x_vp =
            sqrt(1 - abar_t) z``, SiD-LSG's generator input ``add_noise(0, z, t_init)``, ``mingyuanzhou/SiD-LSG``
            ``training/sid_sd_util.py``). Only the first input differs; re-noising between steps is ``x0 + sigma eps``
            either way.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        sigma_init: float = 80.0,
        sampling_sigmas: list[float] | None = None,
        guidance: dict[str, float] | None = None,
        adaptive_weight: nn.Module | None = None,
        input_noise: str = "prior",
    ):
        super().__init__()
        if input_noise not in INPUT_NOISE:
            raise ValueError(f"student.input_noise must be one of {INPUT_NOISE}, got {input_noise!r}")
        self.input_noise = input_noise
        if not float(sigma_init) > 0:
            raise ValueError(f"student.sigma_init must be > 0, got {sigma_init}")
        if sampling_sigmas is not None and any(not float(s) > 0 for s in sampling_sigmas):
            raise ValueError(f"student.sampling_sigmas must all be > 0, got {list(sampling_sigmas)}")
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init)
        self.sampling_sigmas = [float(s) for s in (sampling_sigmas or [sigma_init])]
        self.guidance = dict(guidance) if guidance else None
        if adaptive_weight is not None:
            self.adaptive_weight = adaptive_weight

    def to_config(self) -> dict:
        """Rebuilds this student alone (see ``diffdistill.models.io.model_config``)."""
        from diffdistill.models.io import model_config

        aw = getattr(self, "adaptive_weight", None)
        return {
            "_target_": "diffdistill.models.generator.Generator",
            "denoiser": model_config(self.denoiser),
            "sigma_init": self.sigma_init,
            "sampling_sigmas": self.sampling_sigmas,
            "guidance": self.guidance,
            "adaptive_weight": model_config(aw) if aw is not None else None,
            "input_noise": self.input_noise,
        }

    def set_guidance(self, w_min: float, w_max: float, w_default: float | None = None) -> None:
        """Record the guidance range ``[w_min, w_max]`` a guidance-embedded student was trained on, and the scale
        used when a call gives none (default: the middle of the range)."""
        w_default = 0.5 * (w_min + w_max) if w_default is None else float(w_default)
        if not w_min <= w_default <= w_max:
            raise ValueError(f"default guidance {w_default} lies outside the training range [{w_min}, {w_max}]")
        self.guidance = {"w_min": float(w_min), "w_max": float(w_max), "w_default": w_default}

    def _guided(self, cond: Conditioning | None) -> Conditioning:
        """Fill in the recorded default guidance scale; warn once when asked for a scale outside training."""
        cond = as_conditioning(cond)
        if self.guidance is None:
            return cond
        if cond.guidance_scale is None:
            device = next(self.parameters()).device
            w = torch.full((cond.batch_size or 1,), self.guidance["w_default"], device=device)
            return replace(cond, guidance_scale=w)
        w = cond.guidance_scale
        lo, hi = self.guidance["w_min"], self.guidance["w_max"]
        if not self._warned and (w.min() < lo - 1e-6 or w.max() > hi + 1e-6):
            warnings.warn(
                f"guidance scale {float(w.min()):g}..{float(w.max()):g} outside the range [{lo:g}, {hi:g}] this "
                "student was trained on",
                stacklevel=3,
            )
            self._warned = True
        return cond

    _warned = False

    @classmethod
    def from_teacher(
        cls,
        teacher: nn.Module,
        sigma_init: float = 80.0,
        sampling_sigmas: list[float] | None = None,
        input_noise: str = "prior",
    ) -> Generator:
        """Deep-copy the teacher's denoiser (trainable) as the student's initialisation."""
        return cls(trainable_copy(teacher), sigma_init, sampling_sigmas, input_noise=input_noise)

    def denoise(self, x: Tensor, sigma: Tensor | float, cond: Conditioning | None = None) -> Tensor:
        return self.denoiser(x, as_sigma(sigma, x.shape[0], x.device), self._guided(cond))

    def forward(self, z: Tensor, cond: Conditioning | None = None, sigma: float | Tensor | None = None) -> Tensor:
        """One-step generation from unit noise ``z`` (optionally at another input sigma)."""
        s = self.sigma_init if sigma is None else sigma
        sigma_t = as_sigma(s, z.shape[0], z.device)
        return self.denoiser(self.noise_input(z, sigma_t), sigma_t, self._guided(cond))

    def prior_std(self, sigma: float | Tensor) -> float | Tensor:
        """The scale of unit noise ``z`` that starts this student's sampling at ``sigma`` (``input_noise``): the
        denoiser's ``prior_std(sigma)``, or ``sigma`` itself for ``input_noise="sigma"``. Every sampler of the
        student (``noise_input``, ``sample``, evaluation, the exported pipelines) reads it here."""
        if self.input_noise == "sigma":
            return sigma
        return self.denoiser.prior_std(sigma)

    def noise_input(self, z: Tensor, sigma: Tensor | float) -> Tensor:
        """The student's input for unit noise ``z`` at ``sigma`` (``[B]`` or a float): ``prior_std(sigma) z``, which
        is ``sigma z`` for EDM-family networks and unit noise in the native space of VP / flow adapters (``sigma z``
        for every network with ``input_noise="sigma"``)."""
        from diffdistill.conventions import append_dims

        if not torch.is_tensor(sigma):
            return float(self.prior_std(float(sigma))) * z
        return append_dims(self.prior_std(sigma).to(z.dtype), z.ndim) * z

    def sample(
        self,
        z: Tensor,
        cond: Conditioning | None = None,
        sigmas: list[float] | None = None,
        generator: torch.Generator | None = None,
        gamma: float | None = None,
    ) -> Tensor:
        """Few-step sampling: consistency multistep (default) or TCD gamma sampling when ``gamma`` is set."""
        sigmas = self.sampling_sigmas if sigmas is None else [float(s) for s in sigmas]
        prior = self.prior_std(sigmas[0])
        if gamma is not None:
            return tcd_sample(self.denoise, z, sigmas, gamma, cond, generator, prior_std=prior)
        return multistep_sample(self.denoise, z, sigmas, cond, generator, sigma_min=self.renoise_floor, prior_std=prior)

    @property
    def renoise_floor(self) -> float:
        """The boundary ``sigma_min`` of a boundary-condition student (multistep sampling re-noises to
        ``sqrt(sigma^2 - sigma_min^2)``, Song et al. 2023 Alg. 1), 0 for other students."""
        boundary = getattr(self.denoiser, "boundary_sigma", None)
        return float(boundary) if boundary else 0.0


class FakeScore(WrapsDenoiser, nn.Module):
    """A trainable denoiser that tracks the generator's distribution (DMD, SiD, SIM...).

    Initialised from the teacher (deep copy); trained by denoising score matching on detached samples.
    """

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    @classmethod
    def from_teacher(cls, teacher: nn.Module) -> FakeScore:
        return cls(trainable_copy(teacher))

    def to_config(self) -> dict:
        from diffdistill.models.io import model_config

        return {"_target_": "diffdistill.models.generator.FakeScore", "denoiser": model_config(self.denoiser)}

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Conditioning | None = None) -> Tensor:
        return self.denoiser(x, as_sigma(sigma, x.shape[0], x.device), cond)

    def features(self, x, sigma, cond=None):
        return self.denoiser.features(x, sigma, cond)
