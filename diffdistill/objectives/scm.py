"""sCM: continuous-time consistency models in TrigFlow (sCT and sCD).

Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models" (arXiv:2410.11081;
no official code; re-implemented in NVlabs/FastGen, ``fastgen/methods/consistency_model/sCM.py``).
Symbols -> paper:
    x_t = cos t x0 + sin t z,  z ~ N(0, sigma_d^2 I),  t = arctan(e^tau / sigma_d),  tau ~ N(P_mean, P_std^2)
    f_theta(x_t, t) = cos t x_t - sigma_d sin t F_theta(x_t / sigma_d, t)               (Eq. 7)
    dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t) with CFG (sCD)  or  cos t z - sin t x0 (sCT)
    cos t sin t dF-/dt from one JVP of F_theta- with tangents (cos t sin t dx_t/dt / sigma_d, cos t sin t)
    g = -cos^2 t (sigma_d F- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF-/dt)          (Eq. 8, warm-up r)
    g <- g / (||g|| + c)                                                                 (tangent normalisation)
    L = e^{w_phi(t)} / D ||F_theta - F- - g||^2 - w_phi(t)                              (Eq. 9, adaptive weight)
The student is any EDM-convention denoiser: an EDM-preconditioned network is exactly a TrigFlow network with
``F = -F_edm`` (see :func:`~diffdistill.models.consistency.trigflow_F`), and ``f(x, 0) = x`` holds by construction.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from diffdistill.conventions import append_dims
from diffdistill.models.conditioning import Batch
from diffdistill.models.consistency import AdaptiveWeight, trigflow_F
from diffdistill.models.teacher import can_guide
from diffdistill.objectives.base import LossOutput, Objective, Paper, PassCount, register_objective
from diffdistill.objectives.common import data_noise_scale, discrete_sigma_range, lognormal_sigmas, per_sample_mean
from diffdistill.objectives.consistency import RNGState

JVP_BACKENDS = ("autograd", "finite_difference")


def attach_adaptive_weight(generator: nn.Module, channels: int = 128) -> AdaptiveWeight:
    """Give ``generator`` a submodule ``adaptive_weight`` (sCM's ``w_phi``) unless it has one; it is trained with
    the generator's optimiser, so call this before the optimiser is built."""
    if getattr(generator, "adaptive_weight", None) is None:
        generator.adaptive_weight = AdaptiveWeight(channels, sigma_data=generator.sigma_data)
    return generator.adaptive_weight


def _math_sdpa():
    """Forward-mode AD through fused SDPA kernels is not implemented on CPU: force the math kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()


def _fp32(device_type: str, enabled: bool):
    """Autocast off (fp32) when ``enabled``; a no-op context otherwise."""
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def trigflow_jvp(
    fn, x_t: Tensor, t: Tensor, dxdt: Tensor, backend: str = "autograd", fd_step: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """``(F(x_t, t), cos t sin t dF/dt)`` for ``F = fn(x_t, t)`` along the ODE direction ``dxdt``.

    The tangents are ``(cos t sin t dx_t/dt, cos t sin t)`` on ``(x_t, t)`` (equivalently ``/ sigma_d`` on
    ``x_t / sigma_d``), so the JVP directly returns ``cos t sin t dF/dt`` (the "JVP rearrangement", §4.2).
    ``backend``: ``"autograd"`` (forward-mode, ``torch.func.jvp``) or ``"finite_difference"`` (central).
    """
    cs = torch.cos(t) * torch.sin(t)
    t_x, t_t = append_dims(cs, x_t.ndim) * dxdt, cs
    if backend == "autograd":
        with _math_sdpa():
            return torch.func.jvp(fn, (x_t, t), (t_x, t_t))
    if backend == "finite_difference":
        h = fd_step
        F = fn(x_t, t)
        dF = (fn(x_t + h * t_x, t + h * t_t) - fn(x_t - h * t_x, t - h * t_t)) / (2 * h)
        return F, dF
    raise ValueError(f"unknown jvp_backend '{backend}' (one of {JVP_BACKENDS})")


WARMUP_VARIANTS = ("scm", "rcm")


def scm_tangent(
    x_t: Tensor,
    t: Tensor,
    dxdt: Tensor,
    F_minus: Tensor,
    dFdt_cs: Tensor,
    sigma_data: float,
    warmup: float = 1.0,
    variant: str = "scm",
) -> Tensor:
    """sCM's target direction ``g`` with tangent warm-up ``r``; ``dFdt_cs`` is ``cos t sin t dF-/dt``.

    ``variant="scm"`` (paper, Eq. 8): ``g = -cos^2 t (sigma_d F- - dx/dt) - r cos t sin t (x_t + sigma_d dF-/dt)``.
    ``variant="rcm"`` (``NVlabs/rcm``, ``rcm/models/t2v_model_distill_rcm.py``):
    ``g = -cos t sqrt(1 - r^2 sin^2 t) (sigma_d F- - dx/dt) - (r cos t sin t x_t + sigma_d cos t sin t dF-/dt)``:
    the ``dF/dt`` term is not warmed up.
    Both equal ``cos t df-/dt`` at ``r = 1``.
    """
    c, s = torch.cos(append_dims(t, x_t.ndim)), torch.sin(append_dims(t, x_t.ndim))
    if variant == "scm":
        return -(c**2) * (sigma_data * F_minus - dxdt) - warmup * (c * s * x_t + sigma_data * dFdt_cs)
    if variant == "rcm":
        damp = c * torch.sqrt((1 - warmup**2 * s**2).clamp_min(0))
        return -damp * (sigma_data * F_minus - dxdt) - (warmup * c * s * x_t + sigma_data * dFdt_cs)
    raise ValueError(f"unknown warmup variant '{variant}' (one of {WARMUP_VARIANTS})")


def normalize_tangent(g: Tensor, c: float = 0.1, norm: str = "l2") -> Tensor:
    """``g / (||g|| + c)`` per sample; ``norm="l2"`` (paper text, rCM) or ``"rms"`` (``||g|| / sqrt(D)``, FastGen)."""
    n = torch.linalg.vector_norm(g.flatten(1), dim=1)
    if norm == "rms":
        n = n / g[0].numel() ** 0.5
    elif norm != "l2":
        raise ValueError(f"unknown tangent norm '{norm}' (use 'l2' or 'rms')")
    return g / append_dims(n + c, g.ndim)


@register_objective
class SCM(Objective):
    """sCT / sCD with tangent warm-up, tangent normalisation and learned adaptive weighting (Lu & Song 2024).

    Args:
        teacher: frozen teacher (the tangent of sCD; unused by sCT).
        generator: the student (any EDM-convention denoiser; its ``sigma_data`` is TrigFlow's ``sigma_d``).
        mode: ``"scd"`` (distillation) or ``"sct"`` (training, conditional velocity ``cos t z - sin t x0``).
        P_mean, P_std: ``tau ~ N(P_mean, P_std^2)``, ``t = arctan(e^tau / sigma_d)`` (CIFAR-10: -1.0, 1.4;
            ImageNet: -0.8, 1.6).
        guidance_scale: teacher CFG of the sCD tangent (``None``: the teacher's own).
        jvp_backend: ``"autograd"`` (forward-mode, under the math SDPA kernel) or ``"finite_difference"``.
        fd_step: ``h`` of the central finite difference.
        jvp_fp32: run the JVP (and the tangent) with autocast off, in fp32, when training in bf16/fp16
            (FastGen's ImageNet sCD setting: the JVP is the precision-sensitive part).
        tangent_warmup_steps: ``H`` of ``r = min(1, step / H)`` (10k).
        warmup_variant: ``"scm"`` (paper) or ``"rcm"`` (rCM's warm-up, which leaves ``dF/dt`` un-damped).
        tangent_norm_c, tangent_norm: ``g / (||g|| + c)``, ``c = 0.1``, ``"l2"`` or ``"rms"`` norm.
        adaptive_weighting: learn ``w_phi(t)`` (a submodule ``generator.adaptive_weight``, trained with the
            generator's optimiser; attached in place if missing).
        adaptive_weight_channels: Fourier features of ``w_phi``.
        match_sigma_data: ``P_mean`` is the paper's for ``sigma_d = 0.5``; with the teacher's
            ``c = sigma_data / 0.5`` use ``P_mean + ln c``, so that ``t`` has the paper's density
            (:func:`~diffdistill.conventions.noise_scale`; exact at 0.5).
    """

    name = "scm"
    few_step_student = True  # consistency models sample in one step or several (Song et al. 2023, Alg. 1)
    paper = Paper(
        "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", "2410.11081", "Lu, Song", 2024
    )
    roles = ("generator",)
    requires_real_data = True

    def __init__(
        self,
        teacher: nn.Module | None,
        generator: nn.Module,
        mode: str = "scd",
        P_mean: float = -1.0,
        P_std: float = 1.4,
        guidance_scale: float | None = None,
        jvp_backend: str = "autograd",
        fd_step: float = 1e-3,
        jvp_fp32: bool = True,
        tangent_warmup_steps: int = 10_000,
        warmup_variant: str = "scm",
        tangent_norm_c: float = 0.1,
        tangent_norm: str = "l2",
        adaptive_weighting: bool = True,
        adaptive_weight_channels: int = 128,
        match_sigma_data: bool = True,
    ):
        if mode not in ("scd", "sct"):
            raise ValueError(f"unknown mode '{mode}' (use 'scd' or 'sct')")
        if mode == "scd" and teacher is None:
            raise ValueError("sCD needs a teacher")
        if jvp_backend not in JVP_BACKENDS:
            raise ValueError(f"unknown jvp_backend '{jvp_backend}' (one of {JVP_BACKENDS})")
        if warmup_variant not in WARMUP_VARIANTS:
            raise ValueError(f"unknown warmup_variant '{warmup_variant}' (one of {WARMUP_VARIANTS})")
        if tangent_norm not in ("l2", "rms"):
            raise ValueError(f"unknown tangent_norm '{tangent_norm}' (use 'l2' or 'rms')")
        self.teacher, self.generator, self.mode = teacher, generator, mode
        c = data_noise_scale(teacher, generator, match_sigma_data)
        self.P_mean, self.P_std, self.guidance_scale = float(P_mean) + math.log(c), float(P_std), guidance_scale
        self.sigma_range = discrete_sigma_range(generator)
        self.jvp_backend, self.fd_step, self.jvp_fp32 = jvp_backend, float(fd_step), bool(jvp_fp32)
        self.tangent_warmup_steps, self.warmup_variant = int(tangent_warmup_steps), warmup_variant
        self.tangent_norm_c, self.tangent_norm = float(tangent_norm_c), tangent_norm
        self.adaptive_weighting = adaptive_weighting
        if adaptive_weighting and getattr(generator, "adaptive_weight", None) is None:
            raise ValueError(
                "sCM's adaptive weighting needs the student's adaptive_weight head: build the objective with "
                "SCM.create(...) (or call SCM.prepare_student(generator) first), as the trainer's builder does"
            )

    @classmethod
    def prepare_student(
        cls, generator: nn.Module, adaptive_weighting: bool = True, adaptive_weight_channels: int = 128
    ) -> None:
        """Give the student sCM's learned loss weight ``w_phi(t)`` (Lu & Song 2024, Eq. 9), trained with it."""
        if adaptive_weighting:
            attach_adaptive_weight(generator, adaptive_weight_channels)

    @property
    def sigma_data(self) -> float:
        return float(self.generator.sigma_data)

    def warmup(self, step: int) -> float:
        return 1.0 if self.tangent_warmup_steps <= 0 else min(1.0, step / self.tangent_warmup_steps)

    def sample_t(self, batch_size: int, device) -> Tensor:
        # tau ~ N(P_mean, P_std^2), sigma = e^tau = sigma_d tan t
        return torch.atan(
            lognormal_sigmas(batch_size, self.P_mean, self.P_std, device, self.sigma_range) / self.sigma_data
        )

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x0, cond = batch.x0, batch.cond
        if x0 is None:
            raise ValueError("SCM needs real samples (Batch.x0)")
        sd = self.sigma_data
        t = self.sample_t(x0.shape[0], x0.device)
        z = torch.randn_like(x0) * sd
        ct, st = torch.cos(append_dims(t, x0.ndim)), torch.sin(append_dims(t, x0.ndim))
        x_t = ct * x0 + st * z

        def F_minus_fn(x: Tensor, tt: Tensor) -> Tensor:
            return trigflow_F(self.generator, x, tt, cond, sd)

        with torch.no_grad():
            if self.mode == "sct":
                dxdt = ct * z - st * x0  # conditional velocity
            else:
                dxdt = sd * trigflow_F(self.teacher, x_t, t, cond, sd, guidance_scale=self.guidance_scale)
            rng = RNGState(x0.device)  # the JVP and the student forward share the dropout mask
            # theta- = stopgrad(theta): F- and cos t sin t dF-/dt in one forward-mode pass
            with _fp32(x0.device.type, self.jvp_fp32):
                args = (x_t.float(), t.float(), dxdt.float()) if self.jvp_fp32 else (x_t, t, dxdt)
                F_minus, dFdt_cs = trigflow_jvp(F_minus_fn, *args, self.jvp_backend, self.fd_step)
            # (Eq. 8) tangent with warm-up r, then (§4.2) tangent normalisation
            g = scm_tangent(x_t, t, dxdt, F_minus, dFdt_cs, sd, self.warmup(step), self.warmup_variant)
            g = normalize_tangent(g, self.tangent_norm_c, self.tangent_norm)
            target = F_minus + g
        with rng.replay():
            F_theta = trigflow_F(self.generator, x_t, t, cond, sd)
        sq = per_sample_mean((F_theta - target) ** 2)  # ||F_theta - F- - g||^2 / D
        logs = {"tangent_sq": float(sq.detach().mean()), "t_mean": float(t.mean())}
        if self.adaptive_weighting:
            logvar = self.generator.adaptive_weight(t)
            # (Eq. 9) e^{w_phi} / D ||F_theta - F- - g||^2 - w_phi, written with logvar = -w_phi
            loss = torch.exp(-logvar) * sq + logvar
            logs["logvar_mean"] = float(logvar.detach().mean())
        else:
            loss = sq
        return LossOutput(loss, logs)

    def pass_count(self) -> PassCount:
        teacher = 0.0
        if self.mode == "scd":
            w = self.guidance_scale if self.guidance_scale is not None else getattr(self.teacher, "guidance_scale", 1.0)
            teacher = 2.0 if (can_guide(self.teacher) and w != 1.0) else 1.0
        if self.jvp_backend == "autograd":
            return PassCount(forward=teacher, forward_grad=1.0, backward=1.0, jvp=1.0)
        return PassCount(forward=teacher + 3.0, forward_grad=1.0, backward=1.0)
