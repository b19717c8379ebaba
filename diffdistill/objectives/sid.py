"""Score identity Distillation (SiD), its long-and-short guidance (SiD-LSG) and few-step SiD.

Zhou et al., "Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion Models for
One-Step Generation" (ICML 2024, arXiv:2404.04057); Zhou et al., "Long and Short Guidance in Score identity
Distillation for One-Step Text-to-Image Generation" (arXiv:2406.01561). Official code: ``mingyuanzhou/SiD``
(``training/sid_loss.py``, ``training/sid_training_loop.py``) and ``mingyuanzhou/SiD-LSG``.

Symbols -> paper (SiD §3-4):
    x_g      = G_theta(sigma_init z), sigma_init = 2.5 (``generator``)
    x_t      = x_g + sigma n, sigma from the Karras ramp truncated at t_max = 800 (``truncated_karras_sigmas``)
    f_phi    = the teacher's x0 prediction at x_t (``teacher``; kappa_4 of LSG)
    f_psi    = the fake score's x0 prediction at x_t (``fake_score``; kappa_2 = kappa_3 of LSG)
    omega    = sg(max(1e-5, mean_{CHW} |x_g - f_phi|)), the per-sample normaliser
    L_theta  = sum (f_phi - f_psi) * [(f_phi - x_g) - alpha (f_phi - f_psi)] / omega
             = [(1 - alpha) ||f_phi - f_psi||^2 + (f_phi - f_psi)^T (f_psi - x_g)] / omega
    L_psi    = lambda(sigma) ||f_psi(x_g + sigma n) - x_g||^2 on detached x_g, ln sigma ~ N(-1.2, 1.2^2) (kappa_1)
The generator's gradient flows through x_t into both denoisers (their parameters frozen by the trainer for the
update) and through x_g directly; this is what separates SiD from DMD, whose scores are evaluated without a graph.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from diffdistill.conventions import append_dims
from diffdistill.models.conditioning import Batch
from diffdistill.objectives.base import LossOutput, Objective, Paper, PassCount, UpdateSchedule, register_objective
from diffdistill.objectives.common import check_weighting, data_noise_scale, discrete_sigma_range, lognormal_sigmas
from diffdistill.objectives.score_identity import (
    SIGMA_SAMPLINGS,
    check_ddpm_range,
    check_num_steps,
    ddpm_timestep_sigmas,
    fake_score_loss,
    finite_samples,
    generate,
    guidance_passes,
    keep_samples,
    sanitize_gradient,
    score_forward,
    truncated_karras_sigmas,
)

SID_SIGMA_INIT = 2.5


@dataclass
class SiDPoint:
    """Where one SiD generator loss was evaluated: the samples ``x_g`` (with their graph), ``x_t = x_g + sigma
    noise``, the finite-sample mask ``keep`` and the normaliser ``omega`` (of the kept samples)."""

    x_g: Tensor
    sigma: Tensor
    noise: Tensor
    keep: Tensor
    omega: Tensor | None = None


def sid_loss(x_g: Tensor, x0_real: Tensor, x0_fake: Tensor, alpha: float, omega: Tensor | None = None) -> Tensor:
    """Per-sample SiD generator loss ``sum (f_phi - f_psi)[(f_phi - x_g) - alpha (f_phi - f_psi)] / omega``."""
    diff = x0_real - x0_fake
    # (SiD generator loss; mingyuanzhou/SiD training/sid_loss.py, generator_loss)
    loss = (diff * ((x0_real - x_g) - alpha * diff)).flatten(1).sum(1)
    return loss if omega is None else loss / omega


def sid_normaliser(x_g: Tensor, x0_real: Tensor) -> Tensor:
    """``omega = sg(max(1e-5, mean_{CHW} |x_g - f_phi|))``, ``[B]``."""
    return (x_g - x0_real).detach().abs().flatten(1).mean(1).clamp(min=1e-5)


def check_sigma_init(
    generator,
    objective: str,
    c: float = 1.0,
    paper: float = SID_SIGMA_INIT,
    who: str = "SiD's",
    cite: str = "Zhou et al. 2024",
) -> None:
    """Warn when the student's one-step input noise is far from the paper's (SiD: 2.5; the default student's is
    EDM's 80), carried to the data's scale: ``c paper`` with ``c = sigma_data / 0.5``."""
    s = float(getattr(generator, "sigma_init", paper * c))
    want = paper * c
    if abs(math.log(s / want)) > math.log(4.0):
        scaled = "" if c == 1.0 else f" (the paper's {paper:g} for sigma_data = 0.5, times sigma_data / 0.5 = {c:.3g})"
        warnings.warn(
            f"{objective}: student.sigma_init={s:g}, but {who} generator maps noise at sigma_init = {round(want, 3)}"
            f"{scaled} ({cite}); set student.sigma_init={round(want, 3)} (the shipped experiments do)",
            stacklevel=3,
        )


@register_objective
class SiD(Objective):
    """SiD: the generator loss through the teacher and the fake score, the fake score by denoising score matching.

    Args:
        teacher: frozen teacher (inputs differentiable: the generator's gradient flows through it).
        generator: the one-step (or ``num_steps``-step) student.
        fake_score: trainable denoiser initialised from the teacher.
        alpha: the SiD weight (1.2; 0.5 = the Fisher-divergence gradient including the sampling path, 1 = with
            the sampling distribution held fixed; docs/invariants.md).
        t_max: the largest noise level of the generator loss on the 1000-step Karras ramp (800 -> sigma <= 24.41);
            with ``sigma_sampling="ddpm"`` the exclusive upper DDPM timestep (SiD-LSG: 980).
        rho: the Karras ramp exponent.
        P_mean, P_std: the log-normal noise levels of the fake-score loss (EDM's -1.2, 1.2), stated for
            ``sigma_data = 0.5``: ``P_mean + ln(sigma_data / 0.5)`` is used (``match_sigma_data``; exact at 0.5).
        real_guidance_scale: CFG of the teacher in the generator loss (LSG kappa_4; ``None`` = the teacher's own).
        fake_guidance_scale: CFG of the fake score in the generator loss (LSG kappa_2 = kappa_3; 1 = none).
        fake_train_guidance_scale: CFG of the fake score in its own loss (LSG kappa_1; 1 = none).
        generator_loss_scale: the generator loss multiplier (``lsg`` = 100 in the official scripts; Adam is nearly
            invariant to it, gradient clipping is not).
        normalize: divide by the per-sample normaliser omega (SiD); ``False`` gives the raw loss (toy checks).
        num_steps: student steps; ``k > 1`` trains a k-step student (``student.sampling_sigmas`` of length ``k``)
            with the SiD loss on the output of a random step ``j ~ U{1..k}`` (steps before it without a graph).
        score_gradients: backpropagate through ``x_t`` into both denoisers (SiD). ``False`` detaches ``x_t`` (an
            ablation: only the direct path through ``x_g`` remains).
        checkpoint_scores: activation checkpointing of the teacher and fake-score forwards of the generator loss:
            their activations are recomputed in the backward (one more forward of each, less memory).
        sigma_sampling: ``"karras"`` (SiD: the generator loss on the truncated Karras ramp, the fake loss log-normal)
            or ``"ddpm"`` (SiD-LSG on SD: both losses at DDPM timesteps ``t ~ U{t_min..t_max - 1}`` of the teacher's
            own schedule, ``--tmin 20 --tmax 980``; ``P_mean``, ``P_std`` and ``rho`` are then unused) or
            ``"lognormal"`` (an ablation: the generator loss at the fake loss's ``ln sigma ~ N(P_mean, P_std^2)``,
            Diff-Instruct's law for both; ``t_max`` and ``rho`` unused).
        t_min: the smallest DDPM timestep of ``sigma_sampling="ddpm"`` (SiD-LSG: 20; unused with ``karras``).
        fake_weighting: ``lambda(sigma)`` of the fake-score loss: ``"edm"`` (``1/sigma^2 + 1/sigma_d^2``, SiD),
            ``"eps"`` (``1/sigma^2``: SiD-LSG's eps-MSE) or ``"none"``.
        match_sigma_data: carry the paper's noise levels (stated for ``sigma_data = 0.5``) to the teacher's data
            by ``c = sigma_data / 0.5``, as rescaling the data to 0.5 would: ``P_mean + ln c``, the generator loss's
            Karras ramp times ``c``, ``student.sigma_init`` expected at ``2.5 c`` (exact at 0.5). On the toy
            mixtures (sigma_data 1.3-2.8) carrying only ``P_mean`` measured far worse (8.2x the floor vs 2.5x).
    """

    name = "sid"
    paper = Paper(
        "Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion Models for One-Step "
        "Generation",
        "2404.04057",
        "Zhou et al.",
        2024,
    )
    roles = ("generator", "fake_score")

    def __init__(
        self,
        teacher,
        generator,
        fake_score,
        alpha: float = 1.2,
        t_max: float = 800.0,
        rho: float = 7.0,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        real_guidance_scale: float | None = None,
        fake_guidance_scale: float = 1.0,
        fake_train_guidance_scale: float = 1.0,
        generator_loss_scale: float = 100.0,
        normalize: bool = True,
        num_steps: int = 1,
        score_gradients: bool = True,
        checkpoint_scores: bool = False,
        sigma_sampling: str = "karras",
        t_min: int = 20,
        fake_weighting: str = "edm",
        match_sigma_data: bool = True,
    ):
        if sigma_sampling not in SIGMA_SAMPLINGS:
            raise ValueError(f"sigma_sampling must be one of {SIGMA_SAMPLINGS}, got {sigma_sampling!r}")
        check_weighting("fake_weighting", fake_weighting)
        self.ddpm = check_ddpm_range(teacher, t_min, t_max, self.name) if sigma_sampling == "ddpm" else None
        self.sigma_sampling, self.t_min, self.fake_weighting = sigma_sampling, int(t_min), fake_weighting
        if not 0.0 < t_max <= 1000.0 and self.ddpm is None:
            raise ValueError(f"t_max must lie in (0, 1000], got {t_max}")
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        if not generator_loss_scale > 0:
            raise ValueError(f"generator_loss_scale must be > 0, got {generator_loss_scale}")
        check_num_steps(generator, num_steps)
        # the papers' noise levels are stated for sigma_data = 0.5: carried to the teacher's data by c
        c = self.noise_scale = data_noise_scale(teacher, generator, match_sigma_data)
        self.fake_range = discrete_sigma_range(fake_score)
        check_sigma_init(generator, self.name, c)
        self.teacher, self.generator, self.fake_score = teacher, generator, fake_score
        self.alpha, self.t_max, self.rho = float(alpha), float(t_max), float(rho)
        self.P_mean, self.P_std = float(P_mean) + math.log(c), float(P_std)
        self.real_guidance_scale = real_guidance_scale
        self.fake_guidance_scale = float(fake_guidance_scale)
        self.fake_train_guidance_scale = float(fake_train_guidance_scale)
        self.generator_loss_scale, self.normalize = float(generator_loss_scale), bool(normalize)
        self.num_steps = num_steps
        self.score_gradients, self.checkpoint_scores = bool(score_gradients), bool(checkpoint_scores)
        # 1:1, the fake score first (the official loop updates f_psi, then G_theta, each with fresh noise)
        self.update_schedule = UpdateSchedule(1, generator_warmup_steps=1)

    # ------------------------------------------------------------------------------------------
    def sample_sigmas(self, n: int, device) -> Tensor:
        """Noise levels of the generator loss: the truncated Karras ramp, DDPM timesteps (``ddpm``) or the fake
        loss's log-normal (``lognormal``)."""
        if self.ddpm is not None:
            return ddpm_timestep_sigmas(self.ddpm, n, self.t_min, int(self.t_max), device)
        if self.sigma_sampling == "lognormal":
            return self.fake_sigmas(n, device)
        # the Karras ramp of a teacher trained at sigma_data = 0.5, in the data's units (x c, as for the P_mean)
        c = self.noise_scale
        return truncated_karras_sigmas(
            n, self.t_max, c * float(self.teacher.sigma_min), c * float(self.teacher.sigma_max), self.rho, device
        )

    def fake_sigmas(self, n: int, device) -> Tensor:
        """Noise levels of the fake-score loss (log-normal, or DDPM timesteps with ``sigma_sampling=ddpm``)."""
        if self.ddpm is not None:
            return ddpm_timestep_sigmas(self.ddpm, n, self.t_min, int(self.t_max), device)
        return lognormal_sigmas(n, self.P_mean, self.P_std, device, self.fake_range)

    def scores(self, x_t: Tensor, sigma: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Teacher and fake-score predictions at ``x_t`` (with their LSG guidance scales)."""
        ck = self.checkpoint_scores
        x0_real = score_forward(self.teacher, x_t, sigma, batch.cond, self.real_guidance_scale, ck)
        x0_fake = score_forward(self.fake_score, x_t, sigma, batch.cond, self.fake_guidance_scale, ck)
        return x0_real, x0_fake

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        return self.generator_terms(batch, step)[0]

    def generator_terms(self, batch: Batch, step: int) -> tuple[LossOutput, SiDPoint]:
        """The SiD generator loss and the point it was evaluated at (for terms added there: SiDA's GAN term)."""
        x_g, j = generate(self.generator, batch, self.num_steps, grad=True)
        x_g = sanitize_gradient(x_g)
        sigma = self.sample_sigmas(x_g.shape[0], x_g.device)
        noise = torch.randn_like(x_g)
        x = x_g if self.score_gradients else x_g.detach()
        x_t = x + append_dims(sigma, x_g.ndim) * noise
        x0_real, x0_fake = self.scores(x_t, sigma, batch)
        # drop samples with non-finite values (as the official code does)
        keep = finite_samples(x_g, x0_real, x0_fake)
        point = SiDPoint(x_g, sigma, noise, keep)
        x_g, x0_real, x0_fake = (keep_samples(t, keep) for t in (x_g, x0_real, x0_fake))
        omega = sid_normaliser(x_g, x0_real)
        loss = sid_loss(x_g, x0_real, x0_fake, self.alpha, omega if self.normalize else None)
        loss = self.generator_loss_scale * loss
        logs = {
            "sid_sigma_mean": float(sigma.mean()),
            "sid_omega_mean": float(omega.mean()),
            "sid_score_gap": float((x0_real - x0_fake).detach().flatten(1).norm(dim=1).mean()),
            "sid_dropped": float((~keep).sum()),
        }
        if self.num_steps > 1:
            logs["student_step"] = float(j + 1)
        point.omega = omega
        return LossOutput(loss, logs), point

    def critic_loss(self, batch: Batch, step: int) -> LossOutput:
        with torch.no_grad():  # fresh noise: SiD does not reuse the generator update's samples
            x_g, _ = generate(self.generator, batch, self.num_steps, grad=False)
        loss, logs = fake_score_loss(
            self.fake_score,
            x_g,
            batch.cond,
            guidance_scale=self.fake_train_guidance_scale,
            sigma=self.fake_sigmas(x_g.shape[0], x_g.device),
            weighting=self.fake_weighting,
        )
        return LossOutput(loss, logs)

    # ------------------------------------------------------------------------------------------
    def pass_count(self) -> PassCount:
        return score_pass_count(self, fake_in_graph=True)


def score_pass_count(obj, fake_in_graph: bool) -> PassCount:
    """Passes of one SiD/SIM iteration: generator update (G fwd+bwd; teacher and fake forwards at ``x_t``, with
    a backward to the input where they are in the graph) + fake update (G fwd without graph, fake fwd+bwd)."""
    sim = (obj.num_steps - 1) / 2  # mean no-grad student calls before the trained one
    real = guidance_passes(obj.teacher, obj.real_guidance_scale)
    fake = guidance_passes(obj.fake_score, obj.fake_guidance_scale)
    kappa1 = guidance_passes(obj.fake_score, obj.fake_train_guidance_scale)
    graph = obj.score_gradients
    through = real + (fake if fake_in_graph else 0.0)  # networks backpropagated to their input
    no_graph = (0.0 if fake_in_graph else fake) if graph else real + fake
    recompute = through if (graph and obj.checkpoint_scores) else 0.0
    return PassCount(
        forward=2 * sim + no_graph + 1.0 + recompute,
        forward_grad=1.0 + (through if graph else 0.0) + kappa1,
        backward=1.0 + (through if graph else 0.0) + kappa1,
    )
