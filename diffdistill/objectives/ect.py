"""Consistency training and tuning: iCT (Song & Dhariwal 2023) and ECT (Geng et al. 2024).

iCT, "Improved Techniques for Training Consistency Models" (arXiv:2310.14189; no official code):
    sigma_i < sigma_{i+1}    adjacent points of the ascending Karras grid with N(k) points (doubling curriculum)
    p(i)                     discrete log-normal over the N(k)-1 pairs (P_mean = -1.1, P_std = 2)
    L = 1/(sigma_{i+1} - sigma_i) d(f_theta(x0 + sigma_{i+1} z, sigma_{i+1}), f_sg(theta)(x0 + sigma_i z, sigma_i))
    d = pseudo-Huber on the flattened sample, c = 0.00054 sqrt(D)

ECT, "Consistency Models Made Easy" (arXiv:2406.14548), ``locuslab/ect`` ``training/loss.py``:
    t = exp(P_mean + P_std xi),  r = max(0, t [1 - q^-(s+1) (1 + k sigmoid(-b t))])  (stage s)
    L = (sqrt(||D_theta(x_t, t) - D_sg(theta)(x_r, r)||^2 + c^2) - c) / (t - r),  D_sg(x_r, r) := x0 where r = 0
Both use the online weights without gradient as the target (no EMA), the same noise for both points and the
same dropout mask, and start from a teacher copy (tuning) or from scratch (the trainer's initialisation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffdistill.conventions import append_dims
from diffdistill.models.conditioning import Batch
from diffdistill.objectives.base import LossOutput, Objective, Paper, PassCount, register_objective
from diffdistill.objectives.common import data_noise_scale, discrete_sigma_range, lognormal_sigmas, pseudo_huber
from diffdistill.objectives.consistency import (
    ConsistencyDistillation,
    RNGState,
    default_huber_c,
    heun_step,
    require_boundary_condition,
)
from diffdistill.schedules.karras import karras_sigmas

# ---------------------------------------------------------------------------------------------
# iCT schedules


def ict_num_scales(step: int, total_steps: int = 400_000, s0: int = 10, s1: int = 1280) -> int:
    """Doubling curriculum ``N(k) = min(s0 2^floor(k / K'), s1) + 1``, ``K' = floor(K / (log2 floor(s1/s0) + 1))``
    (iCT Eq. 8)."""
    k_prime = math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** (step // max(k_prime, 1)), s1) + 1


def ict_pair_probs(sigmas_ascending: Tensor, P_mean: float = -1.1, P_std: float = 2.0) -> Tensor:
    """Discrete log-normal ``p(sigma_i) ∝ erf((ln sigma_{i+1} - P_mean)/(sqrt2 P_std)) - erf((ln sigma_i - P_mean)/
    (sqrt2 P_std))`` over the ``N - 1`` adjacent pairs (iCT Eq. 9); sums to 1."""
    cdf = torch.erf((sigmas_ascending.double().log() - P_mean) / (math.sqrt(2.0) * P_std))
    p = cdf[1:] - cdf[:-1]
    return (p / p.sum()).float()


# ---------------------------------------------------------------------------------------------
# ECT schedules


def ect_r(t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0, mapping: str = "sigmoid") -> Tensor:
    """ECT's ``r(t)`` (``locuslab/ect`` ``training/loss.py`` L39-50): ``sigmoid``:
    ``max(0, t [1 - q^-(s+1) (1 + k sigmoid(-b t))])``; ``const``: ``t (1 - q^-(s+1))``."""
    decay = q ** -(stage + 1)
    if mapping == "sigmoid":
        ratio = 1.0 - decay * (1.0 + k * torch.sigmoid(-b * t))
    elif mapping == "const":
        ratio = torch.full_like(t, 1.0 - decay)
    else:
        raise ValueError(f"unknown ECT mapping '{mapping}' (use 'sigmoid' or 'const')")
    return (t * ratio).clamp(min=0.0)


def _norm_distance(diff: Tensor, c: float) -> Tensor:
    """``sqrt(||d||^2 + c^2) - c`` per sample; ``c = 0`` is the unsquared L2 norm (ECT's default)."""
    if c > 0:
        return pseudo_huber(diff, c)
    return torch.linalg.vector_norm(diff.flatten(1), dim=1)


PAIRS = ("data", "teacher")


def check_pair(pair: str, teacher: nn.Module | None, name: str) -> str:
    """``pair``: ``"data"`` (consistency training, the papers') or ``"teacher"`` (an ablation: the lower point of
    the pair is the teacher's Heun step from the upper one, as in consistency distillation)."""
    if pair not in PAIRS:
        raise ValueError(f"objective.pair must be one of {PAIRS}, got {pair!r}")
    if pair == "teacher" and teacher is None:
        raise ValueError(f"{name} with objective.pair=teacher needs a teacher (the backbone config group)")
    return pair


# ---------------------------------------------------------------------------------------------


@register_objective
class ICT(Objective):
    """Improved consistency training (Song & Dhariwal 2023).

    Args:
        generator: the student (denoiser wrapped in place in the boundary-condition parametrisation).
        teacher: unused by the loss (accepted so the trainer can pass every role; it may initialise the student).
        sigma_min, sigma_max, rho: the Karras grid (0.002, 80, 7).
        s0, s1, total_steps: curriculum ``N(k)`` (10, 1280, K = 400k: N = 11, 21, 41, ..., 1281).
        P_mean, P_std: discrete log-normal pair sampling (-1.1, 2.0).
        huber_c: pseudo-Huber ``c`` (``None``: ``0.00054 sqrt(D)``, times ``sigma_data / 0.5`` with
            ``match_sigma_data``: the paper's residuals are those of data at 0.5; a given value is used as is).
        boundary_condition: wrap the student so that ``f(x, sigma_min) = x``.
        match_sigma_data: the grid and ``P_mean`` are the paper's for ``sigma_data = 0.5``; with the teacher's
            ``c = sigma_data / 0.5`` use ``[c sigma_min, c sigma_max]``, ``P_mean + ln c`` and the default
            pseudo-Huber ``c`` times c (:func:`~diffdistill.conventions.noise_scale`; exact at 0.5).
        pair: ``"data"`` (the paper: ``x0 + sigma_i z``, the one-sample estimate of the PF-ODE step) or
            ``"teacher"`` (an ablation that isolates that estimate: the teacher's Heun step from
            ``x0 + sigma_{i+1} z`` to ``sigma_i``, i.e. CD (Song et al. 2023, Eq. 7) on iCT's grid and loss).
    """

    name = "ict"
    few_step_student = True  # consistency models sample in one step or several (Song et al. 2023, Alg. 1)
    paper = Paper("Improved Techniques for Training Consistency Models", "2310.14189", "Song, Dhariwal", 2023)
    roles = ("generator",)
    requires_real_data = True

    def __init__(
        self,
        generator: nn.Module,
        teacher: nn.Module | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        s0: int = 10,
        s1: int = 1280,
        total_steps: int = 400_000,
        P_mean: float = -1.1,
        P_std: float = 2.0,
        huber_c: float | None = None,
        boundary_condition: bool = True,
        match_sigma_data: bool = True,
        pair: str = "data",
    ):
        self.pair = check_pair(pair, teacher, "ICT")
        self.generator, self.teacher = generator, teacher
        c = data_noise_scale(teacher, generator, match_sigma_data)
        self.sigma_min, self.sigma_max, self.rho = c * float(sigma_min), c * float(sigma_max), float(rho)
        self.s0, self.s1, self.total_steps = int(s0), int(s1), int(total_steps)
        self.P_mean, self.P_std, self.huber_c = float(P_mean) + math.log(c), float(P_std), huber_c
        self.noise_scale = c  # the default pseudo-Huber c is in data units too: c 0.00054 sqrt(D)
        if boundary_condition:
            require_boundary_condition(self, generator)
        self._grid: tuple[int, Tensor, Tensor] | None = None

    # the boundary condition at c sigma_min (Song & Dhariwal 2023, as in Song et al. 2023, Eq. 5), as CD's
    prepare_student = ConsistencyDistillation.__dict__["prepare_student"]

    def grid(self, step: int) -> tuple[Tensor, Tensor]:
        """The ascending grid of ``N(step)`` points and its pair probabilities (cached per ``N``)."""
        n = ict_num_scales(step, self.total_steps, self.s0, self.s1)
        if self._grid is None or self._grid[0] != n:
            sigmas = karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho).flip(0)
            self._grid = (n, sigmas, ict_pair_probs(sigmas, self.P_mean, self.P_std))
        return self._grid[1], self._grid[2]

    def pseudo_huber_c(self, x0: Tensor) -> float:
        """``huber_c``, or the paper's ``0.00054 sqrt(D)`` carried to the data's scale (times ``sigma_data / 0.5``)."""
        return default_huber_c(x0, self.noise_scale) if self.huber_c is None else float(self.huber_c)

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x0, cond = batch.x0, batch.cond
        if x0 is None:
            raise ValueError("ICT needs real samples (Batch.x0)")
        sigmas, probs = self.grid(step)
        i = torch.multinomial(probs, x0.shape[0], replacement=True)
        sigma_lo, sigma_hi = sigmas[i].to(x0.device), sigmas[i + 1].to(x0.device)
        z = torch.randn_like(x0)  # the same z for both points
        x_hi = x0 + append_dims(sigma_hi, x0.ndim) * z
        with torch.no_grad():
            if self.pair == "teacher":
                x_lo = heun_step(self.teacher, x_hi, sigma_hi, sigma_lo, cond)
            else:
                # (iCT Eq. 6) the one-sample PF-ODE step: the same z at the lower level
                x_lo = x0 + append_dims(sigma_lo, x0.ndim) * z
        rng = RNGState(x0.device)
        pred = self.generator.denoise(x_hi, sigma_hi, cond)
        with torch.no_grad(), rng.replay():
            # theta- = stopgrad(theta): the online weights, same dropout mask
            target = self.generator.denoise(x_lo, sigma_lo, cond)
        c = self.pseudo_huber_c(x0)
        # (iCT Eq. 10) lambda(sigma_i) = 1/(sigma_{i+1} - sigma_i); pseudo-Huber on the flattened sample
        dist = _norm_distance(pred - target, c)
        loss = dist / (sigma_hi - sigma_lo)
        return LossOutput(loss, {"distance": float(dist.detach().mean()), "num_scales": float(len(sigmas))})

    def pass_count(self) -> PassCount:
        return PassCount(forward=1.0 + (2.0 if self.pair == "teacher" else 0.0), forward_grad=1.0, backward=1.0)


@register_objective
class ECT(Objective):
    """Easy consistency tuning (Geng et al. 2024), CIFAR-10 defaults of ``locuslab/ect``.

    Args:
        generator: the student, plain EDM scalings during training (boundary handled by the clean target).
        teacher: unused by the loss (ECT tunes a student initialised from the teacher).
        P_mean, P_std: log-normal ``t`` (-1.1, 2.0).
        q, k, b, mapping: ``r(t)`` (q = 2 on CIFAR-10, 4 on ImageNet; k = 8, b = 1; ``"sigmoid"`` or ``"const"``).
        double_every: optimiser steps per stage (250 ticks x 12.8 kimg / batch 128 = 25,000).
        huber_c: ``c`` of ``sqrt(||.||^2 + c^2) - c`` (0: the unsquared L2 norm, the default).
        weighting: ``"ect"`` = ``1/(t - r)`` (CIFAR-10) or ``"karras"`` = ``(t^2 + sigma_d^2)/(t sigma_d)^2``
            (``imgnet`` branch).
        match_sigma_data: ``P_mean`` and ``r(t)`` are the paper's for ``sigma_data = 0.5``; with the teacher's
            ``c = sigma_data / 0.5`` use ``P_mean + ln c`` and ``r = c r_paper(t / c)``
            (:func:`~diffdistill.conventions.noise_scale`; exact at 0.5).
        pair: ``"data"`` (the paper: ``x_r = y + r eps``) or ``"teacher"`` (an ablation that isolates the one-sample
            estimate: ``x_r`` is the teacher's Heun step from ``x_t`` to ``r``; where ``r = 0`` the target is the
            teacher's ``D(x_t, t)``, its Euler step to 0, instead of ``y``).
    """

    name = "ect"
    few_step_student = True  # consistency models sample in one step or several (Song et al. 2023, Alg. 1)
    paper = Paper("Consistency Models Made Easy", "2406.14548", "Geng, Pokle, Luo, Lin, Kolter", 2024)
    roles = ("generator",)
    requires_real_data = True

    def __init__(
        self,
        generator: nn.Module,
        teacher: nn.Module | None = None,
        P_mean: float = -1.1,
        P_std: float = 2.0,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        mapping: str = "sigmoid",
        double_every: int = 25_000,
        huber_c: float = 0.0,
        weighting: str = "ect",
        match_sigma_data: bool = True,
        pair: str = "data",
    ):
        self.pair = check_pair(pair, teacher, "ECT")
        if weighting not in ("ect", "karras"):
            raise ValueError(f"unknown weighting '{weighting}' (use 'ect' or 'karras')")
        ect_r(torch.ones(1), 0, q, k, b, mapping)  # validates the mapping
        self.generator, self.teacher = generator, teacher
        self.noise_scale = data_noise_scale(teacher, generator, match_sigma_data)
        self.P_mean, self.P_std = float(P_mean) + math.log(self.noise_scale), float(P_std)
        self.sigma_range = discrete_sigma_range(generator)
        self.q, self.k, self.b, self.mapping = float(q), float(k), float(b), mapping
        self.double_every, self.huber_c, self.weighting = int(double_every), float(huber_c), weighting

    def stage(self, step: int) -> int:
        return step // self.double_every

    def r_of_t(self, t: Tensor, step: int) -> Tensor:
        """The paired noise level ``r(t)`` of stage ``step // double_every``, in the data's units: the paper's
        ``r`` (stated for ``sigma_data = 0.5``) carried by ``c``: ``c r_paper(t / c)``."""
        c = self.noise_scale
        return c * ect_r(t / c, self.stage(step), self.q, self.k, self.b, self.mapping)

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        y, cond = batch.x0, batch.cond
        if y is None:
            raise ValueError("ECT needs real samples (Batch.x0)")
        B = y.shape[0]
        t = lognormal_sigmas(B, self.P_mean, self.P_std, y.device, self.sigma_range)
        r = self.r_of_t(t, step)
        eps = torch.randn_like(y)  # the same eps for both points
        x_t = y + append_dims(t, y.ndim) * eps
        r_safe = torch.where(r > 0, r, t)  # never evaluates a network at sigma = 0
        with torch.no_grad():
            if self.pair == "teacher":
                clean = self.teacher(x_t, t, cond)  # D(x_t, t): the Euler step to sigma = 0, and Heun's first stage
                x_r = heun_step(self.teacher, x_t, t, r_safe, cond, denoised=clean)
            else:
                # (ECT Eq. 6) the one-sample PF-ODE step: the same eps at r, and y itself at r = 0
                x_r, clean = y + append_dims(r_safe, y.ndim) * eps, y
        rng = RNGState(y.device)
        pred = self.generator.denoise(x_t, t, cond)
        with torch.no_grad(), rng.replay():
            target = self.generator.denoise(x_r, r_safe, cond)
            # r <= 0: the boundary f(x, 0) = x gives the clean point; NaNs in the target are zeroed
            target = torch.where(append_dims(r > 0, y.ndim), torch.nan_to_num(target), clean)
        dist = _norm_distance(pred - target, self.huber_c)
        if self.weighting == "ect":
            # (ECT Eq. 6) d(f(x_t, t), f_sg(x_r, r)) / (t - r)
            loss = dist / (t - r)
        else:
            sd = self.generator.sigma_data
            loss = dist * (t**2 + sd**2) / (t * sd) ** 2
        return LossOutput(
            loss,
            {
                "distance": float(dist.detach().mean()),
                "stage": float(self.stage(step)),
                "clean_target_frac": float((r <= 0).float().mean()),
            },
        )

    def pass_count(self) -> PassCount:
        return PassCount(forward=1.0 + (2.0 if self.pair == "teacher" else 0.0), forward_grad=1.0, backward=1.0)
