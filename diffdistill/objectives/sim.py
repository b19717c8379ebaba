"""Score Implicit Matching (SIM).

Luo et al., "One-Step Diffusion Distillation through Score Implicit Matching" (NeurIPS 2024, arXiv:2410.16794).
No official training code exists (``maple-research-lab/SIM`` is inference only): this is a clean-room
implementation from the paper.

Symbols -> paper (SIM §3):
    x_g        = G_theta(sigma_init z)                          (``generator``; x_0 of the paper)
    x_t        = x_g + sigma eps                                (EDM view: alpha_t = 1, sigma_t = sigma)
    s_p, s_psi = the teacher's and the fake score's scores at x_t (``teacher``, ``fake_score``)
    y_t        = sg(s_p(x_t) - s_psi(x_t))
    d(y)       = sqrt(||y||^2 + c^2) - c,  d'(y) = y / sqrt(||y||^2 + c^2)   (pseudo-Huber)
    L_SIM      = w(t) <d'(y_t), s_p(x_t) - grad_{x_t} log q_t(x_t | x_0)>
The gradient of L_SIM is ``w(t) J_{s_p}(x_t)^T d'(y_t)`` (the second term of the bracket, ``eps / sigma``, does not
depend on theta): one vector-Jacobian product through the teacher, none through the fake score. The fake score is
trained as in SiD (EDM-weighted denoising score matching on detached samples, alternating 1:1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffdistill.conventions import append_dims
from diffdistill.models.conditioning import Batch
from diffdistill.objectives.base import LossOutput, Objective, Paper, PassCount, UpdateSchedule, register_objective
from diffdistill.objectives.common import data_noise_scale
from diffdistill.objectives.consistency import ict_huber_c
from diffdistill.objectives.score_identity import (
    check_num_steps,
    fake_score_loss,
    finite_samples,
    generate,
    guided_denoise,
    keep_samples,
    sanitize_gradient,
    score_forward,
    truncated_karras_sigmas,
)
from diffdistill.objectives.sid import check_sigma_init, score_pass_count


def pseudo_huber_grad(y: Tensor, c: float) -> Tensor:
    """``d'(y) = y / sqrt(||y||^2 + c^2)`` on the flattened per-sample vector (0 where ``y = 0`` even for c = 0)."""
    norm2 = y.flatten(1).pow(2).sum(1)
    return y / append_dims((norm2 + c * c).sqrt().clamp(min=1e-20), y.ndim)


@register_objective
class SIM(Objective):
    """SIM with the pseudo-Huber distance: a teacher VJP along ``d'(y)``, the fake score trained as in SiD.

    The paper leaves three details open; the choices and their reasons:

    * **y is detached, from x_t as well as theta.** The paper's gradient identity evaluates ``y_t`` at the
      stop-gradient parameters, so ``y_t`` is a constant of the update; only the teacher is backpropagated (one VJP,
      no backward through the fake score: cheaper than SiD). The detached form has the same stationary point
      (``y = 0``) and descent direction as the divergence (tested on the Gaussian toy).
    * **Units, weight w(t) and c.** The distance acts on ``sigma^2 y = f_phi(x_t) - f_psi(x_t)`` (denoiser
      differences, in data units) with ``c = 0.00054 sqrt(D)`` (iCT's constant for data-unit differences, ``D`` =
      elements per sample, stated for ``sigma_data = 0.5``: times ``sigma_data / 0.5`` with ``match_sigma_data``),
      and ``w(t) = sigma^2``. Then ``L = <d'(f_phi - f_psi), f_phi(x_t) - x_g>`` and the
      gradient w.r.t. ``x_g`` is ``(J_{f_phi} - I)^T d'``, whose norm stays O(1) at every noise level without a
      normaliser (``J_{s_p} ~ -I / sigma^2`` at high noise). In score units this is the paper's pseudo-Huber with
      a noise-dependent ``c / sigma^2``: for each t a valid distance (zero iff the scores agree), so the
      divergence keeps its minimiser.
    * **Noise levels.** Those of SiD's generator loss (the Karras ramp truncated at ``t_max = 800``), so SiD and
      SIM differ in the distance only.

    Args:
        teacher: frozen teacher (inputs differentiable: the gradient is a VJP through it).
        generator: the one-step (or ``num_steps``-step) student.
        fake_score: trainable denoiser initialised from the teacher.
        c: pseudo-Huber constant in data units (``None`` = ``0.00054 sqrt(D)``, carried to
            ``sigma_data`` as the noise levels; ``0`` = the unit vector ``y/|y|``).
        t_max, rho: the truncated Karras noise levels of the generator loss (as SiD).
        P_mean, P_std: log-normal noise levels of the fake-score loss (SiD's -1.2, 1.2 for ``sigma_data = 0.5``;
            ``P_mean + ln(sigma_data / 0.5)`` is used with ``match_sigma_data``).
        real_guidance_scale: CFG of the teacher (``None`` = the teacher's own).
        fake_guidance_scale: CFG of the fake score in ``y`` (1 = none).
        fake_train_guidance_scale: CFG of the fake score in its own loss (1 = none).
        num_steps: student steps (``> 1``: a k-step student trained on a random step's output, as few-step SiD).
        checkpoint_scores: activation checkpointing of the teacher forward of the generator loss.
        match_sigma_data: carry SiD's noise levels to the teacher's ``sigma_data`` (as :class:`SiD`).
    """

    name = "sim"
    paper = Paper("One-Step Diffusion Distillation through Score Implicit Matching", "2410.16794", "Luo et al.", 2024)
    roles = ("generator", "fake_score")
    score_gradients = True

    def __init__(
        self,
        teacher,
        generator,
        fake_score,
        c: float | None = None,
        t_max: float = 800.0,
        rho: float = 7.0,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        real_guidance_scale: float | None = None,
        fake_guidance_scale: float = 1.0,
        fake_train_guidance_scale: float = 1.0,
        num_steps: int = 1,
        checkpoint_scores: bool = False,
        match_sigma_data: bool = True,
    ):
        if c is not None and not c >= 0:
            raise ValueError(f"c must be >= 0 or null, got {c}")
        if not 0.0 < t_max <= 1000.0:
            raise ValueError(f"t_max must lie in (0, 1000], got {t_max}")
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        check_num_steps(generator, num_steps)
        # SiD's noise levels, at the data's sigma_data
        scale = self.noise_scale = data_noise_scale(teacher, generator, match_sigma_data)
        check_sigma_init(generator, self.name, scale)
        self.teacher, self.generator, self.fake_score = teacher, generator, fake_score
        D = math.prod(generator.sample_shape)
        self.c = ict_huber_c(D, scale) if c is None else float(c)
        self.t_max, self.rho = float(t_max), float(rho)
        self.P_mean, self.P_std = float(P_mean) + math.log(scale), float(P_std)
        self.real_guidance_scale = real_guidance_scale
        self.fake_guidance_scale = float(fake_guidance_scale)
        self.fake_train_guidance_scale = float(fake_train_guidance_scale)
        self.num_steps, self.checkpoint_scores = num_steps, bool(checkpoint_scores)
        self.update_schedule = UpdateSchedule(1, generator_warmup_steps=1)  # 1:1, fake score first (as SiD)

    def sample_sigmas(self, n: int, device) -> Tensor:
        # the Karras ramp of a teacher trained at sigma_data = 0.5, in the data's units (x c, as for the P_mean)
        c = self.noise_scale
        return truncated_karras_sigmas(
            n, self.t_max, c * float(self.teacher.sigma_min), c * float(self.teacher.sigma_max), self.rho, device
        )

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x_g, j = generate(self.generator, batch, self.num_steps, grad=True)
        x_g = sanitize_gradient(x_g)
        sigma = self.sample_sigmas(x_g.shape[0], x_g.device)
        x_t = x_g + append_dims(sigma, x_g.ndim) * torch.randn_like(x_g)
        # the teacher in the graph (its VJP is the gradient); the fake score only inside the detached y
        x0_real = score_forward(self.teacher, x_t, sigma, batch.cond, self.real_guidance_scale, self.checkpoint_scores)
        with torch.no_grad():
            x0_fake = guided_denoise(self.fake_score, x_t.detach(), sigma, batch.cond, self.fake_guidance_scale)
        keep = finite_samples(x_g, x0_real, x0_fake)
        x_g, x0_real, x0_fake = (keep_samples(t, keep) for t in (x_g, x0_real, x0_fake))
        # (SIM §3) y_t = sg(s_p - s_psi), here sigma^2 y_t = f_phi - f_psi in data units, and d'(y_t)
        d_prime = pseudo_huber_grad((x0_real - x0_fake).detach(), self.c)
        # (SIM §3) w(t) <d'(y_t), s_p(x_t) - grad log q_t(x_t | x_g)> with w = sigma^2, = <d', f_phi(x_t) - x_g>
        loss = (d_prime * (x0_real - x_g)).flatten(1).sum(1)
        logs = {
            "sim_sigma_mean": float(sigma.mean()),
            "sim_dprime_norm": float(d_prime.flatten(1).norm(dim=1).mean()),
            "sim_dropped": float((~keep).sum()),
        }
        if self.num_steps > 1:
            logs["student_step"] = float(j + 1)
        return LossOutput(loss, logs)

    def critic_loss(self, batch: Batch, step: int) -> LossOutput:
        with torch.no_grad():
            x_g, _ = generate(self.generator, batch, self.num_steps, grad=False)
        loss, logs = fake_score_loss(
            self.fake_score, x_g, batch.cond, self.P_mean, self.P_std, self.fake_train_guidance_scale
        )
        return LossOutput(loss, logs)

    def pass_count(self) -> PassCount:
        return score_pass_count(self, fake_in_graph=False)
