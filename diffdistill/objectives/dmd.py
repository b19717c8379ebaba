"""Distribution Matching Distillation.

Yin et al., "One-step Diffusion with Distribution Matching Distillation" (CVPR 2024, arXiv:2311.18828) and
"Improved Distribution Matching Distillation for Fast Image Synthesis" (NeurIPS 2024, arXiv:2405.14867).

Symbols -> paper (DMD v1 §3.2, DMD2 §4; official code ``tianweiy/DMD2`` ``main/edm/edm_guidance.py``):
    x          = G_theta(z), the one-step sample (``generator``)
    x_t        = x + sigma eps, the same noisy point for both scores
    x0_real    = mu_base(x_t, t) with CFG  (``teacher``)
    x0_fake    = mu_fake^phi(x_t, t)        (``fake_score``)
    g          = (x0_fake - x0_real) / mean_{CHW} |x - x0_real|      (DMD Eq. 7-8 in denoiser form)
The generator minimises the surrogate 1/2 mean((x - sg(x - g))^2) whose gradient w.r.t. x is g / numel;
the fake score minimises the EDM-weighted denoising loss on detached generator samples (DMD Eq. 6).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.objectives.base import LossOutput, Objective, Paper, PassCount, UpdateSchedule, register_objective
from diffdistill.objectives.common import (
    add_noise,
    denoising_score_matching_loss,
    dm_timestep_grid,
    gradient_injection_loss,
    karras_index_sigmas,
    per_sample_mean,
)
from diffdistill.schedules.karras import KarrasSchedule


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor, normalize: bool = True) -> Tensor:
    """DMD's per-element gradient ``g = (x0_fake - x0_real) / mean_{CHW}|x - x0_real|`` (DMD Eq. 8).

    With ``normalize=False`` this is ``sigma^2 (s_real - s_fake)`` up to the sign convention, i.e. the
    unnormalised KL gradient direction. NaNs (e.g. a zero normaliser) are zeroed, as in the released code.
    """
    g = x0_fake - x0_real
    if normalize:
        weight = per_sample_mean((x - x0_real).abs())  # [B]
        g = g / weight.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


@register_objective
class DMD(Objective):
    """DMD: distribution-matching gradient + fake-score denoising loss.

    Args:
        teacher: frozen teacher (its CFG applies to the real branch only).
        generator: the one-step student.
        fake_score: trainable denoiser initialised from the teacher.
        schedule: the Karras grid the DM timesteps index into (1000 levels, ascending).
        min_step_percent, max_step_percent: DM timesteps ``k ~ U{0.02 T .. 0.98 T}`` (DMD2 defaults).
        real_guidance_scale: CFG of the real score (``None`` = the teacher's own scale).
        fake_weighting: ``"edm"`` (``1/sigma^2 + 1/sigma_d^2``, DMD2 EDM code) or ``"none"``.
        critic_steps_per_generator_step: 1 in DMD (v1); DMD2 uses 5 (ImageNet) / 10 (SD1.5).
        normalize: use the per-sample normaliser (DMD Eq. 8); ``False`` gives the raw KL gradient.
    """

    name = "dmd"
    paper = Paper("One-step Diffusion with Distribution Matching Distillation", "2311.18828", "Yin et al.", 2024)
    roles = ("generator", "fake_score")

    def __init__(
        self,
        teacher,
        generator,
        fake_score,
        schedule: KarrasSchedule | None = None,
        min_step_percent: float = 0.02,
        max_step_percent: float = 0.98,
        real_guidance_scale: float | None = None,
        fake_weighting: str = "edm",
        critic_steps_per_generator_step: int = 1,
        generator_warmup_steps: int = 0,
        normalize: bool = True,
    ):
        if fake_weighting not in ("edm", "none"):
            raise ValueError(f"unknown fake_weighting '{fake_weighting}' (use 'edm' or 'none')")
        if not 0.0 <= min_step_percent <= max_step_percent <= 1.0:
            raise ValueError(
                f"need 0 <= min_step_percent <= max_step_percent <= 1, got {min_step_percent}, {max_step_percent}"
            )
        self.teacher, self.generator, self.fake_score = teacher, generator, fake_score
        self.sigmas, self.k_min, self.k_max = dm_timestep_grid(schedule, teacher, min_step_percent, max_step_percent)
        self.real_guidance_scale = real_guidance_scale
        self.fake_weighting, self.normalize = fake_weighting, normalize
        self.update_schedule = UpdateSchedule(critic_steps_per_generator_step, generator_warmup_steps)

    # ------------------------------------------------------------------------------------------
    def generate(self, batch: Batch) -> tuple[Tensor, Conditioning]:
        cond = batch.cond
        n = batch.batch_size
        device = batch.x0.device if batch.x0 is not None else next(self.generator.parameters()).device
        z = torch.randn(n, *self.generator.sample_shape, device=device)
        return self.generator(z, cond), cond

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x, cond = self.generate(batch)
        with torch.no_grad():
            sigma = karras_index_sigmas(self.sigmas, x.shape[0], self.k_min, self.k_max, x.device)
            x_t, _ = add_noise(x.detach(), sigma)
            # (DMD Eq. 7) real and fake scores at the same noisy point, no backprop through either
            x0_real = self.teacher(x_t, sigma, cond, guidance_scale=self.real_guidance_scale)
            x0_fake = self.fake_score(x_t, sigma, cond)
            # (DMD Eq. 8) per-sample normalised gradient
            g = dmd_gradient(x.detach(), x0_real, x0_fake, self.normalize)
        batch.scratch["dmd_generated"] = (x.detach(), cond)
        # inject g through the surrogate MSE (as DMD2's code does; docs/invariants.md §5)
        loss = gradient_injection_loss(x, g)
        return LossOutput(
            loss, {"dm_grad_norm": float(g.flatten(1).norm(dim=1).mean()), "dm_sigma_mean": float(sigma.mean())}
        )

    def critic_loss(self, batch: Batch, step: int) -> LossOutput:
        cached = batch.scratch.pop("dmd_generated", None)
        if cached is not None:
            x, cond = cached  # DMD2 re-uses the images generated in the same iteration
        else:
            with torch.no_grad():
                x, cond = self.generate(batch)
        # (DMD Eq. 6) fake-score denoising loss over the full sigma range
        sigma = karras_index_sigmas(self.sigmas, x.shape[0], 0, len(self.sigmas) - 1, x.device)
        loss = denoising_score_matching_loss(self.fake_score, x.detach(), sigma, cond, self.fake_weighting)
        return LossOutput(loss, {"fake_dsm": float(loss.detach().mean())})

    def pass_count(self) -> PassCount:
        r = self.update_schedule.critic_steps_per_generator_step
        cfg = 2.0 if (self.real_guidance_scale or getattr(self.teacher, "guidance_scale", 1.0)) != 1.0 else 1.0
        # generator step (every r-th iteration): G fwd+bwd, teacher fwd (x2 with CFG), fake fwd
        gen = PassCount(forward=cfg + 1.0, forward_grad=1.0, backward=1.0)
        # critic step (every iteration): fake fwd+bwd (+ a no-grad G forward when the cache is empty)
        crit_fwd = 0.0 if r == 1 else 1.0
        return PassCount(
            forward=gen.forward / r + crit_fwd * (r - 1) / r,
            forward_grad=gen.forward_grad / r + 1.0,
            backward=gen.backward / r + 1.0,
        )
