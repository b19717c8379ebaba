"""rCM: score-regularised continuous-time consistency distillation.

Zheng et al., "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency" (ICLR 2026;
arXiv:2510.08431; code NVlabs/rcm, ``rcm/models/t2v_model_distill_rcm.py``). rCM = sCD with rCM's tangent
warm-up + a DMD-style score-distillation regulariser on few-step samples, with a fake score trained 4 : 1
against the student after the warm-up.

    student step (iter < H, or (iter - H) % 5 == 0):
        L = 100 sum_dims ||F_theta - F- - g||^2                          (sCM term, rCM warm-up, no adaptive weight)
          + [iter >= H] sum_dims ||x0 - sg(x0 - Delta)||^2                (score regulariser)
        x0 = backward simulation with n = (iter mod 4) + 1 student steps, gradient through the last one only
        Delta = (x0_fake(x_tD) - x0_teacher^cfg(x_tD)) / max(1e-5, mean |x0 - x0_teacher^cfg(x_tD)|)
    critic step (otherwise):
        L = sum_dims ||x0 - x0_fake(x_tD, t_D)||^2 / sin^2 t_D           (flow-space MSE; docs/invariants.md §4)

Times: the sCM term draws t from sCM's log-normal ``p_G``; the regulariser and the critic draw sigma from DMD2's
Karras-index density (``min_step_percent``..``max_step_percent`` of the teacher's grid). rCM's Wan recipe uses a
shifted rectified-flow time for ``p_D`` instead; with an EDM teacher the DMD2 density is the natural analogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.models.teacher import can_guide
from diffdistill.objectives.base import LossOutput, Objective, Paper, PassCount, UpdateSchedule, register_objective
from diffdistill.objectives.common import add_noise, backward_simulation, dm_timestep_grid, karras_index_sigmas
from diffdistill.objectives.dmd import dmd_gradient
from diffdistill.objectives.scm import SCM
from diffdistill.schedules.karras import KarrasSchedule


def rcm_critic_loss(
    fake_score: nn.Module, x0: Tensor, sigma: Tensor, cond, sigma_data: float, noise: Tensor | None = None
) -> Tensor:
    """Per-sample ``sum_dims ||x0 - x0_fake(x_t, t)||^2 / sin^2 t`` at ``sigma = sigma_d tan t`` (rCM critic).

    ``sin^2 t = sigma^2 / (sigma^2 + sigma_d^2)``; with ``sigma_d = 1`` this is the flow-space MSE
    ``||F_fake - (cos t x_t - x0) / sin t||^2`` (docs/invariants.md §4).
    """
    x_t, _ = add_noise(x0, sigma, noise)
    sin2 = sigma**2 / (sigma**2 + sigma_data**2)
    return (fake_score(x_t, sigma, cond) - x0).pow(2).flatten(1).sum(1) / sin2


@dataclass
class RCMSchedule(UpdateSchedule):
    """Student-only during the tangent warm-up, then one student step per ``period`` iterations (rCM: 5, i.e.
    4 critic updates per student update). ``critic_steps_per_generator_step`` is the cycle length."""

    tangent_warmup_steps: int = 0

    def is_generator_step(self, step: int) -> bool:
        if step < self.tangent_warmup_steps:
            return True
        return (step - self.tangent_warmup_steps) % self.critic_steps_per_generator_step == 0


@register_objective
class RCM(Objective):
    """rCM: sCD (rCM warm-up, unweighted, summed) + a DMD score regulariser on backward-simulated few-step samples.

    Args:
        teacher, generator, fake_score: the roles (``fake_score`` starts as a copy of the teacher).
        schedule: the Karras grid of ``p_D`` (DMD2's timestep density).
        P_mean, P_std: sCM's ``p_G`` (tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d)).
        guidance_scale: teacher CFG of the sCD tangent and of the regulariser (``None``: the teacher's own).
        tangent_warmup_steps: rCM's warm-up ``H`` (Wan: 1000); the regulariser and the critic start after it.
        period: one student step every ``period`` iterations after the warm-up (rCM: 5).
        max_student_steps: backward simulation uses ``(iter mod max_student_steps) + 1`` student steps (rCM: 4).
        scm_weight, dmd_weight: 100 and 1 (rCM's per-sample sums).
        min_step_percent, max_step_percent: ``p_D`` as a fraction of the grid (DMD2: 0.02, 0.98).
        jvp_backend, fd_step, jvp_fp32, tangent_norm_c, match_sigma_data: as in
            :class:`~diffdistill.objectives.scm.SCM`.
    """

    name = "rcm"
    few_step_student = True  # consistency models sample in one step or several (Song et al. 2023, Alg. 1)
    paper = Paper(
        "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency",
        "NVlabs/rcm (ICLR 2026)",
        "Zheng et al.",
        2025,
    )
    roles = ("generator", "fake_score")
    requires_real_data = True

    def __init__(
        self,
        teacher: nn.Module,
        generator: nn.Module,
        fake_score: nn.Module,
        schedule: KarrasSchedule | None = None,
        P_mean: float = -0.8,
        P_std: float = 1.6,
        guidance_scale: float | None = None,
        tangent_warmup_steps: int = 1000,
        period: int = 5,
        max_student_steps: int = 4,
        scm_weight: float = 100.0,
        dmd_weight: float = 1.0,
        min_step_percent: float = 0.02,
        max_step_percent: float = 0.98,
        jvp_backend: str = "autograd",
        fd_step: float = 1e-3,
        jvp_fp32: bool = True,
        tangent_norm_c: float = 0.1,
        match_sigma_data: bool = True,
    ):
        if period < 2 or max_student_steps < 1:
            raise ValueError(f"need period >= 2 and max_student_steps >= 1, got {period}, {max_student_steps}")
        self.teacher, self.generator, self.fake_score = teacher, generator, fake_score
        # rCM's sCM term: sCD, rCM warm-up, full-norm tangent normalisation, no adaptive weighting
        self.scm = SCM(
            teacher,
            generator,
            mode="scd",
            P_mean=P_mean,
            P_std=P_std,
            guidance_scale=guidance_scale,
            jvp_backend=jvp_backend,
            fd_step=fd_step,
            jvp_fp32=jvp_fp32,
            tangent_warmup_steps=tangent_warmup_steps,
            warmup_variant="rcm",
            tangent_norm_c=tangent_norm_c,
            tangent_norm="l2",
            adaptive_weighting=False,
            match_sigma_data=match_sigma_data,
        )
        self.guidance_scale = guidance_scale
        self.sigmas, self.k_min, self.k_max = dm_timestep_grid(schedule, teacher, min_step_percent, max_step_percent)
        self.max_student_steps, self.scm_weight, self.dmd_weight = int(max_student_steps), scm_weight, dmd_weight
        self.update_schedule = RCMSchedule(int(period), 0, int(tangent_warmup_steps))

    @property
    def tangent_warmup_steps(self) -> int:
        return self.update_schedule.tangent_warmup_steps

    def sample_p_D(self, n: int, device) -> Tensor:
        return karras_index_sigmas(self.sigmas, n, self.k_min, self.k_max, device)

    def backward_simulation(self, batch: Batch, n_steps: int, grad: bool) -> tuple[Tensor, Conditioning]:
        """Few-step student samples: start at ``sigma_init`` from pure noise, ``n_steps`` student calls with
        intermediate sigmas from ``p_D`` made monotone by a running minimum and fresh noise at each re-noising;
        only the last call builds a graph (when ``grad``)."""
        cond, n = batch.cond, batch.batch_size
        device = batch.x0.device
        sigma = torch.full((n,), float(self.generator.sigma_init), device=device)
        x = self.generator.noise_input(torch.randn_like(batch.x0), sigma)
        x0, _ = backward_simulation(
            self.generator.denoise,
            x,
            sigma,
            n_steps,
            cond,
            lambda i, s: torch.minimum(s, self.sample_p_D(n, device)),
            grad,
        )
        return x0, cond

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        out = self.scm.generator_loss(batch, step)  # per-sample mean over D of ||F_theta - F- - g||^2
        D = batch.x0[0].numel()
        # (rCM sCM term) 100 sum_dims ||F_theta - F- - g||^2
        loss = self.scm_weight * D * out.loss
        logs = {**out.logs, "scm_loss": float(loss.detach().mean())}
        if step >= self.tangent_warmup_steps and self.dmd_weight > 0:
            x0, cond = self.backward_simulation(batch, step % self.max_student_steps + 1, grad=True)
            with torch.no_grad():
                sigma = self.sample_p_D(x0.shape[0], x0.device)
                x_t, _ = add_noise(x0.detach(), sigma)
                x0_real = self.teacher(x_t, sigma, cond, guidance_scale=self.guidance_scale)
                x0_fake = self.fake_score(x_t, sigma, cond)
                delta = dmd_gradient(x0.detach(), x0_real, x0_fake)  # normalised by mean |x0 - x0_real|
            # (rCM score regulariser) sum_dims ||x0 - sg(x0 - Delta)||^2
            dmd = (x0 - (x0 - delta).detach()).pow(2).flatten(1).sum(1)
            loss = loss + self.dmd_weight * dmd
            logs["dmd_loss"] = float(dmd.detach().mean())
        return LossOutput(loss, logs)

    def critic_loss(self, batch: Batch, step: int) -> LossOutput | None:
        if self.update_schedule.is_generator_step(step):
            return None  # rCM alternates: an iteration is either a student or a critic step
        with torch.no_grad():
            x0, cond = self.backward_simulation(batch, step % self.max_student_steps + 1, grad=False)
        sigma = self.sample_p_D(x0.shape[0], x0.device)
        loss = rcm_critic_loss(self.fake_score, x0, sigma, cond, float(self.generator.sigma_data))
        return LossOutput(loss, {"fake_flow_mse": float(loss.detach().mean())})

    def pass_count(self) -> PassCount:
        """Average over one cycle after the warm-up (1 student + ``period - 1`` critic iterations)."""
        p, m = self.update_schedule.critic_steps_per_generator_step, self.max_student_steps
        sim = (m + 1) / 2  # mean student calls of a backward simulation
        w = self.guidance_scale if self.guidance_scale is not None else getattr(self.teacher, "guidance_scale", 1.0)
        cfg = 2.0 if (can_guide(self.teacher) and w != 1.0) else 1.0
        scm = self.scm.pass_count()
        # student step: sCD term + (sim - 1) no-grad student calls, the last with a graph and its backward,
        # teacher (CFG) and fake forwards
        student = PassCount(
            forward=scm.forward + (sim - 1) + cfg + 1.0,
            forward_grad=scm.forward_grad + 1.0,
            backward=scm.backward + 1.0,
            jvp=scm.jvp,
        )
        # critic step: sim no-grad student calls, fake forward + backward
        critic = PassCount(forward=sim, forward_grad=1.0, backward=1.0)
        return PassCount(
            forward=(student.forward + (p - 1) * critic.forward) / p,
            forward_grad=(student.forward_grad + (p - 1) * critic.forward_grad) / p,
            backward=(student.backward + (p - 1) * critic.backward) / p,
            jvp=student.jvp / p,
        )
