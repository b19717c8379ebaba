"""Latent Consistency Models: guided consistency distillation with skipping steps.

Luo, Tan, Huang, Li, Zhao, "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference"
(arXiv:2310.04378), Alg. 1 (LCD) in the EDM view:
    w ~ U[w_min, w_max]                  guidance scale, fed to the student as ``Conditioning.guidance_scale``
    t_{n+k} -> t_n                       a skipping step of k grid points (k = 20 on a 1000-point grid)
    x_hat = Psi(x_{t_{n+k}}, w)          one DDIM (= Euler in the EDM view) step of the CFG teacher
    L = d(f_theta(x_{t_{n+k}}, w, t_{n+k}), f_theta-(x_hat, w, t_n)),  theta- EMA (mu = 0.95)
Guidance convention: diffdistill's ``w`` (1 = no guidance, CFG ``x0_u + w (x0_c - x0_u)``) is LCM's ``omega + 1``
(LCM Eq. 9: ``(1 + omega) eps_c - omega eps_u``). diffusers agrees: ``train_lcm_distill_sd_wds.py`` samples its
``w`` (= omega: ``pred_x0 = x0_c + w (x0_c - x0_u)``, ``--w_min 5 --w_max 15``, i.e. diffdistill ``[6, 16]``) and
embeds ``guidance_scale_embedding(w)``; the SD pipelines embed ``guidance_scale - 1``; so a pipeline's
``guidance_scale`` is diffdistill's ``w``, and the embedding's input is ``omega = w - 1``.

Student parametrisation (``prepare_student``): on a VP discrete-time backbone (``DiffusersSDDenoiser``,
``DiffusersVPDenoiser``) LCM's own boundary scalings on timesteps
(:class:`~diffdistill.models.consistency.LCMBoundaryDenoiser`: ``c_skip = 0.25 / ((10 t)^2 + 0.25)``, ``c_out = 10 t /
sqrt((10 t)^2 + 0.25)``), exactly diffusers' ``LCMScheduler``, so the student exports to it; on EDM-family
networks Song et al.'s boundary condition at the smallest grid sigma
(:class:`~diffdistill.models.consistency.ConsistencyDenoiser`). The training grid of a VP discrete-time teacher
defaults to its own DDPM timesteps.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from diffdistill.models.backbones import has_guidance_embedding
from diffdistill.models.consistency import discrete_vp_schedule, wrap_boundary_condition
from diffdistill.models.teacher import can_guide
from diffdistill.objectives.base import Paper, PassCount, register_objective
from diffdistill.objectives.common import data_noise_scale
from diffdistill.objectives.consistency import ConsistencyDistillation, euler_step, heun_step
from diffdistill.schedules.karras import karras_sigmas


def enable_guidance_embedding(module: nn.Module) -> bool:
    """Turn on the guidance embedding of every backbone inside ``module`` that supports it (zero-initialised, so
    the output is unchanged); returns whether any backbone has one."""
    found = False
    for m in module.modules():
        if hasattr(m, "enable_guidance_embedding"):
            m.enable_guidance_embedding()
            found = True
    return found


def lcm_grid(schedule, num_scales: int, sigma_min: float, sigma_max: float, rho: float, c: float = 1.0) -> Tensor:
    """The ascending training grid: a DDPM schedule's ``T`` sigmas (the model's own), else a Karras grid (a
    schedule's ``num_scales`` sigmas, or ``[sigma_min, sigma_max]``) scaled by ``c = sigma_data / 0.5``."""
    if schedule is not None and hasattr(schedule, "alphas_cumprod"):
        return schedule.sigmas.float()
    if schedule is not None:
        return c * schedule.sigmas(num_scales, ascending=True).float()
    return c * karras_sigmas(num_scales, sigma_min, sigma_max, rho).flip(0)


def default_schedule(schedule, teacher: nn.Module | None, generator: nn.Module | None):
    """``schedule``, else the DDPM schedule of a VP discrete-time teacher (or student): LCM distils SD on its own
    ``T`` training timesteps (LCM §4.1, ``DDIMSolver(noise_scheduler.alphas_cumprod, ...)`` in diffusers' script)."""
    if schedule is not None:
        return schedule
    return discrete_vp_schedule(teacher) or discrete_vp_schedule(generator)


@register_objective
class LCM(ConsistencyDistillation):
    """Latent consistency distillation (LCD) with a guidance-conditioned student.

    Args:
        teacher, generator, target_generator: as in :class:`ConsistencyDistillation`.
        schedule: the training grid: a :class:`~diffdistill.schedules.discrete.DDPMSchedule` (its ``T`` sigmas, the
            paper's SD setting) or a :class:`~diffdistill.schedules.karras.KarrasSchedule`; ``None``: a Karras grid
            of ``num_scales`` points over ``[sigma_min, sigma_max]``.
        num_scales: grid size when ``schedule`` is not a DDPM schedule (1000, matching SD's T).
        skipping_step: ``k`` (20: 50 solver steps over 1000 timesteps).
        sigma_min, sigma_max, rho: the Karras grid when no schedule is given.
        w_min, w_max: guidance range in diffdistill's convention, ``w = omega + 1`` (LCM's omega in [2, 14] -> w in
            [3, 15]; diffusers' script ``--w_min 5 --w_max 15`` -> w in [6, 16]); an exported SD student is called
            with ``guidance_scale = w``.
        solver: teacher ODE solver over one skipping step: ``"ddim"`` (paper) or ``"heun"``.
        target_ema: ``mu`` (0.95).
        distance: ``"l2"`` (paper) or any distance of :class:`ConsistencyDistillation`.
        huber_c, lpips_net, lpips_weights: as in :class:`ConsistencyDistillation`.
        embed_guidance: switch on the students' guidance embedding in place (backbones with
            ``enable_guidance_embedding``); the trainer must build the optimiser after the objective.
        boundary_condition: wrap the student with boundary ``sigma_0`` (the smallest grid sigma).
        match_sigma_data: a Karras grid is the paper's for ``sigma_data = 0.5``; scale it by the teacher's
            ``sigma_data / 0.5`` (:func:`~diffdistill.conventions.noise_scale`; exact at 0.5; DDPM grids are kept).
    """

    name = "lcm"
    paper = Paper(
        "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference",
        "2310.04378",
        "Luo, Tan, Huang, Li, Zhao",
        2023,
    )

    def __init__(
        self,
        teacher: nn.Module,
        generator: nn.Module,
        target_generator: nn.Module | None = None,
        schedule=None,
        num_scales: int = 1000,
        skipping_step: int = 20,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        w_min: float = 3.0,
        w_max: float = 15.0,
        solver: str = "ddim",
        target_ema: float = 0.95,
        distance: str = "l2",
        huber_c: float | None = None,
        lpips_net: str = "vgg",
        lpips_weights: str | None = None,
        embed_guidance: bool = True,
        boundary_condition: bool = True,
        match_sigma_data: bool = True,
    ):
        if solver not in ("ddim", "heun"):
            raise ValueError(f"unknown solver '{solver}' (use 'ddim' or 'heun')")
        if not w_min <= w_max:
            raise ValueError(f"need w_min <= w_max, got {w_min}, {w_max}")
        c = data_noise_scale(teacher, generator, match_sigma_data)
        schedule = default_schedule(schedule, teacher, generator)
        sigmas_asc = lcm_grid(schedule, num_scales, sigma_min, sigma_max, rho, c)
        if not 1 <= skipping_step < len(sigmas_asc):
            raise ValueError(f"skipping_step must lie in [1, {len(sigmas_asc) - 1}], got {skipping_step}")
        # the guidance embedding is switched on by prepare_student (recorded in the student's config)
        self.embedded_guidance = bool(embed_guidance) and has_guidance_embedding(generator)
        boundary = float(sigmas_asc[0])
        super().__init__(
            teacher,
            generator,
            target_generator,
            num_scales=len(sigmas_asc),
            sigma_min=boundary,
            sigma_max=float(sigmas_asc[-1]),
            rho=rho,
            target_ema=target_ema,
            distance=distance,
            huber_c=huber_c,
            weighting="uniform",
            guidance_scale=None,
            lpips_net=lpips_net,
            lpips_weights=lpips_weights,
            boundary_condition=boundary_condition,
            match_sigma_data=False,  # the grid above is already in the data's units
        )
        if target_generator is not None:
            self.target_generator.load_state_dict(self.generator.state_dict())
        self.sigmas_asc, self.skipping_step = sigmas_asc, int(skipping_step)
        T = len(sigmas_asc)
        self.start_index = torch.arange(T - 1, 0, -self.skipping_step)  # 999, 979, ..., 19
        self.target_index = (self.start_index - self.skipping_step).clamp(min=0)
        self.w_min, self.w_max, self.solver = float(w_min), float(w_max), solver
        self._w: Tensor | None = None

    @classmethod
    def prepare_student(
        cls,
        generator: nn.Module,
        teacher: nn.Module | None = None,
        schedule=None,
        num_scales: int = 1000,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        w_min: float = 3.0,
        w_max: float = 15.0,
        embed_guidance: bool = True,
        boundary_condition: bool = True,
        match_sigma_data: bool = True,
    ) -> None:
        """Switch on the student's guidance embedding (LCM §4.2; zero-initialised, so the output is unchanged) and
        record its training range ``[w_min, w_max]``, then add the boundary condition at the smallest grid sigma.
        An unconditional teacher has no guidance to distil, so its students get no embedding."""
        if embed_guidance and not can_guide(teacher):
            embed_guidance = False
        if embed_guidance and enable_guidance_embedding(generator) and hasattr(generator, "set_guidance"):
            generator.set_guidance(w_min, w_max)
        if not boundary_condition:
            return
        if discrete_vp_schedule(generator) is not None:
            # (LCM Eq. 8 with diffusers' discrete scalings, LCMScheduler.get_scalings_for_boundary_condition_discrete)
            wrap_boundary_condition(generator, 0.0, kind="lcm")
            return
        c = data_noise_scale(teacher, generator, match_sigma_data)
        boundary = float(lcm_grid(schedule, num_scales, sigma_min, sigma_max, rho, c)[0])
        wrap_boundary_condition(generator, boundary)

    def sample_pair(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """A skipping pair ``(sigma_{n+k}, sigma_n)`` of the grid (student at the larger sigma)."""
        j = torch.randint(0, len(self.start_index), (batch_size,))
        return self.sigmas_asc[self.start_index[j]].to(device), self.sigmas_asc[self.target_index[j]].to(device)

    def student_cond(self, cond, batch_size: int, device):
        # (LCM Alg. 1, l. 4) w ~ U[w_min, w_max], a condition of the student and of the target
        self._w = self.w_min + (self.w_max - self.w_min) * torch.rand(batch_size, device=device)
        return replace(cond, guidance_scale=self._w)

    def teacher_step(self, x_t: Tensor, sigma: Tensor, sigma_next: Tensor, cond) -> Tensor:
        # (LCM Eq. 9) the augmented PF-ODE: the teacher's CFG prediction with the sampled w, one DDIM step
        step = euler_step if self.solver == "ddim" else heun_step
        return step(self.teacher, x_t, sigma, sigma_next, cond, self._w)

    def pass_count(self) -> PassCount:
        guided = can_guide(self.teacher)
        teacher = (1.0 if self.solver == "ddim" else 2.0) * (2.0 if guided else 1.0)
        return PassCount(forward=teacher + 1.0, forward_grad=1.0, backward=1.0)
