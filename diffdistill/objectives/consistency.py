"""Consistency Distillation (CD) and the pieces shared by the consistency family.

Song, Dhariwal, Chen, Sutskever, "Consistency Models" (ICML 2023, arXiv:2303.01469); official code
``openai/consistency_models``, ``cm/karras_diffusion.py``.

Symbols -> paper (Alg. 2):
    sigma_n > sigma_{n+1}    adjacent points of the descending Karras grid with N scales (``num_scales``)
    x_t = x0 + sigma_n eps   the student input
    x_hat                    one Heun step of the teacher PF-ODE from sigma_n to sigma_{n+1} (with CFG)
    f_theta(x_t, sigma_n)    the student (boundary-condition parametrisation, ``f(x, sigma_min) = x``)
    f_theta-(x_hat, ...)     the EMA target ``theta- <- mu theta- + (1 - mu) theta`` (mu = 0.95), no gradient
    L = lambda(sigma_n) d(f_theta, f_theta-)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from diffdistill.conventions import append_dims
from diffdistill.models.conditioning import Batch
from diffdistill.models.consistency import discrete_vp_schedule, has_boundary_condition, wrap_boundary_condition
from diffdistill.models.teacher import can_guide
from diffdistill.objectives.base import LossOutput, Objective, Paper, PassCount, register_objective
from diffdistill.objectives.common import (
    add_noise,
    data_noise_scale,
    elementwise_pseudo_huber,
    per_sample_mean,
    pseudo_huber,
)
from diffdistill.schedules.karras import karras_sigmas

DISTANCES = ("l2", "l1", "pseudo_huber", "huber_elementwise", "lpips")
LCM_HUBER_C = 0.001  # diffusers' LCM scripts, --huber_c
CD_WEIGHTINGS = ("uniform", "karras", "snr", "snr+1", "truncated-snr")


# ---------------------------------------------------------------------------------------------
# shared pieces


class RNGState:
    """Capture the RNG state before the student forward and replay it for the target forward, so that both
    draw the same dropout mask (openai/consistency_models ``karras_diffusion.py`` L190/L198; ECT likewise)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the captured state; afterwards the RNG continues as if the block had not run."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def ict_huber_c(num_elements: int, noise_scale: float = 1.0) -> float:
    """iCT's pseudo-Huber constant ``c = 0.00054 sqrt(D)``, ``D`` = elements per sample (Song & Dhariwal 2023, §3.3),
    stated for data at ``sigma_data = 0.5``: times ``noise_scale`` (``sigma_data / 0.5``) for data at another scale."""
    return noise_scale * 0.00054 * float(num_elements) ** 0.5


def default_huber_c(x: Tensor, noise_scale: float = 1.0) -> float:
    """:func:`ict_huber_c` for samples shaped like ``x`` (a batch)."""
    return ict_huber_c(x[0].numel(), noise_scale)


def build_lpips(net: str = "vgg", weights: str | None = None) -> nn.Module:
    """An ``lpips.LPIPS`` metric that never downloads.

    ``weights`` is the path of a ``state_dict`` of the whole ``lpips.LPIPS`` module (trunk and linear heads), or
    ``"random"`` for a random trunk (tests only: the distance is then not perceptual).
    """
    import lpips

    if weights is None:
        raise ValueError(
            "distance='lpips' needs `lpips_weights`: the path of an lpips.LPIPS state_dict "
            "(trunk + linear layers; diffdistill never downloads weights) or 'random' for tests"
        )
    metric = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    if weights != "random":
        metric.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return metric.eval().requires_grad_(False)


def consistency_distance(
    x: Tensor,
    y: Tensor,
    kind: str,
    huber_c: float | None = None,
    lpips_fn: nn.Module | None = None,
    noise_scale: float = 1.0,
) -> Tensor:
    """Per-sample distance ``d(x, y)`` of the consistency family, shape ``[B]``.

    ``l2``: mean over elements of the squared error; ``l1``: mean absolute error; ``pseudo_huber``:
    ``sqrt(||x - y||^2 + c^2) - c`` on the flattened sample (``c=None``: :func:`default_huber_c` at ``noise_scale``);
    ``huber_elementwise``: the mean over elements of ``sqrt((x - y)^2 + c^2) - c`` (diffusers' LCM scripts;
    ``c=None``: 0.001); ``lpips``: LPIPS on ``(x + 1) / 2``, bilinearly upsampled to 224 below 256 px
    (openai/consistency_models L219-232).
    """
    if kind == "l2":
        return per_sample_mean((x - y) ** 2)
    if kind == "l1":
        return per_sample_mean((x - y).abs())
    if kind == "pseudo_huber":
        return pseudo_huber(x - y, default_huber_c(x, noise_scale) if huber_c is None else huber_c)
    if kind == "huber_elementwise":
        return elementwise_pseudo_huber(x - y, LCM_HUBER_C if huber_c is None else huber_c)
    if kind == "lpips":
        if lpips_fn is None:
            raise ValueError("distance='lpips' needs an LPIPS module")
        if x.ndim != 4:
            raise ValueError("the LPIPS distance needs images [B, C, H, W]")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if x.shape[-1] < 256:
            x = nn.functional.interpolate(x, size=224, mode="bilinear", align_corners=False)
            y = nn.functional.interpolate(y, size=224, mode="bilinear", align_corners=False)
        # lpips.LPIPS(normalize=True) maps [0, 1] inputs to [-1, 1]; feeding (x + 1) / 2 reproduces the released code
        return lpips_fn((x + 1) / 2, (y + 1) / 2, normalize=True).reshape(x.shape[0])
    raise ValueError(f"unknown distance '{kind}' (one of {DISTANCES})")


def cd_weight(sigma: Tensor, kind: str, sigma_data: float) -> Tensor:
    """``lambda(sigma)`` of openai/consistency_models (``karras_diffusion.py`` L18-31), at the student sigma."""
    if kind == "uniform":
        return torch.ones_like(sigma)
    if kind == "karras":
        return sigma**-2 + sigma_data**-2
    if kind == "snr":
        return sigma**-2
    if kind == "snr+1":
        return sigma**-2 + 1.0
    if kind == "truncated-snr":
        return (sigma**-2).clamp(min=1.0)
    raise ValueError(f"unknown weighting '{kind}' (one of {CD_WEIGHTINGS})")


def heun_step(
    teacher: nn.Module, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond, guidance_scale=None, denoised=None
) -> Tensor:
    """One Heun step of the PF-ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al. 2022, Alg. 1);
    ``denoised``: ``D(x, sigma)`` when the caller has it already (one teacher pass fewer)."""
    s, s_next = append_dims(sigma, x.ndim), append_dims(sigma_next, x.ndim)
    x0_hat = teacher(x, sigma, cond, guidance_scale=guidance_scale) if denoised is None else denoised
    d = (x - x0_hat) / s
    x_euler = x + (s_next - s) * d
    d_next = (x_euler - teacher(x_euler, sigma_next, cond, guidance_scale=guidance_scale)) / s_next
    return x + (s_next - s) * 0.5 * (d + d_next)


def euler_step(teacher: nn.Module, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond, guidance_scale=None) -> Tensor:
    """One Euler step of the PF-ODE; in the EDM view this is exactly the DDIM step
    ``x' = x0_hat + (sigma' / sigma) (x - x0_hat)`` (Song et al. 2021)."""
    x0_hat = teacher(x, sigma, cond, guidance_scale=guidance_scale)
    return x0_hat + append_dims(sigma_next / sigma, x.ndim) * (x - x0_hat)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, mu: float) -> None:
    """``theta- <- mu theta- + (1 - mu) theta``; buffers are copied."""
    for pt, p in zip(target.parameters(), online.parameters()):
        pt.lerp_(p.detach().to(pt.dtype), 1.0 - mu)
    for bt, b in zip(target.buffers(), online.buffers()):
        bt.copy_(b)


def _device(batch: Batch, module: nn.Module) -> torch.device:
    if batch.x0 is not None:
        return batch.x0.device
    return next(iter(module.parameters())).device


# ---------------------------------------------------------------------------------------------


def require_boundary_condition(objective: Objective, *students: nn.Module) -> None:
    """Fail clearly when a student was not given the boundary condition by ``prepare_student``."""
    for student in students:
        if not has_boundary_condition(getattr(student, "denoiser", student)):
            name = type(objective).__name__
            raise ValueError(
                f"{name} needs a student with the boundary condition f(x, sigma_min) = x: build the objective with "
                f"{name}.create(...) (or call {name}.prepare_student(generator) first), as the trainer's builder does"
            )


@register_objective
class ConsistencyDistillation(Objective):
    """Consistency distillation with a Heun teacher step and an EMA target (Song et al. 2023, Alg. 2).

    Args:
        teacher: frozen teacher (EDM scalings; CFG via ``guidance_scale``).
        generator: the student; its denoiser is wrapped in place by
            :class:`~diffdistill.models.consistency.ConsistencyDenoiser` unless it already has a boundary condition.
        target_generator: the EMA target ``theta-`` (the trainer's frozen deep copy; a deep copy if ``None``).
        num_scales: ``N`` of the Karras grid (18 for CIFAR-10 in the paper, 40 for ImageNet-64 / LSUN).
        sigma_min, sigma_max, rho: the Karras grid (0.002, 80, 7).
        target_ema: ``mu`` of the target update (0.95, ``--target_ema_mode fixed``).
        distance: ``"lpips"`` (paper), ``"l2"``, ``"l1"``, ``"pseudo_huber"`` (iCT's, on the per-sample norm) or
            ``"huber_elementwise"`` (diffusers' LCM scripts' ``--loss_type huber``, per element).
        huber_c: pseudo-Huber ``c`` (``None``: ``0.00054 sqrt(D)`` for ``pseudo_huber``, times ``sigma_data / 0.5``
            with ``match_sigma_data``; 0.001 for ``huber_elementwise``, diffusers' constant).
        weighting: ``lambda(sigma_n)``: ``"uniform"`` (all released runs), ``"karras"``, ``"snr"``, ``"snr+1"``,
            ``"truncated-snr"``.
        guidance_scale: teacher CFG scale ``w`` (``None``: the teacher's own).
        lpips_net, lpips_weights: LPIPS trunk and the path of its state dict (``"random"`` for tests).
        boundary_condition: wrap the student in the boundary-condition parametrisation.
        match_sigma_data: ``sigma_min``, ``sigma_max`` are the paper's for ``sigma_data = 0.5``; scale them by the
            teacher's ``sigma_data / 0.5`` (:func:`~diffdistill.conventions.noise_scale`; exact at 0.5).
    """

    name = "cd"
    few_step_student = True  # consistency models sample in one step or several (Song et al. 2023, Alg. 1)
    paper = Paper("Consistency Models", "2303.01469", "Song, Dhariwal, Chen, Sutskever", 2023)
    roles = ("generator",)
    frozen_roles = ("target_generator",)
    requires_real_data = True

    def __init__(
        self,
        teacher: nn.Module,
        generator: nn.Module,
        target_generator: nn.Module | None = None,
        num_scales: int = 18,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        target_ema: float = 0.95,
        distance: str = "lpips",
        huber_c: float | None = None,
        weighting: str = "uniform",
        guidance_scale: float | None = None,
        lpips_net: str = "vgg",
        lpips_weights: str | None = None,
        boundary_condition: bool = True,
        match_sigma_data: bool = True,
    ):
        if num_scales < 2:
            raise ValueError(f"num_scales must be >= 2, got {num_scales}")
        if not 0.0 <= target_ema < 1.0:
            raise ValueError(f"target_ema must lie in [0, 1), got {target_ema}")
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance '{distance}' (one of {DISTANCES})")
        cd_weight(torch.ones(1), weighting, 0.5)  # validates the name
        self.teacher, self.generator = teacher, generator
        c = data_noise_scale(teacher, generator, match_sigma_data)
        self.noise_scale = c  # the default pseudo-Huber c is in data units too
        self.sigma_min, self.sigma_max = c * float(sigma_min), c * float(sigma_max)
        if discrete_vp_schedule(teacher) is not None:  # a DDPM-family teacher (SD: [0.029, 14.6]) has no other sigmas
            self.sigma_min = max(self.sigma_min, float(teacher.sigma_min))
            self.sigma_max = min(self.sigma_max, float(teacher.sigma_max))
        self.rho = float(rho)
        self.num_scales, self.target_ema = int(num_scales), float(target_ema)
        self.distance, self.huber_c, self.weighting = distance, huber_c, weighting
        self.guidance_scale = guidance_scale
        self.lpips = build_lpips(lpips_net, lpips_weights) if distance == "lpips" else None
        if target_generator is None:
            target_generator = copy.deepcopy(generator)
        if boundary_condition:
            require_boundary_condition(self, generator, target_generator)
        self.target_generator = target_generator
        self.sigmas = karras_sigmas(self.num_scales, self.sigma_min, self.sigma_max, self.rho)  # descending

    @classmethod
    def prepare_student(
        cls,
        generator: nn.Module,
        sigma_min: float = 0.002,
        boundary_condition: bool = True,
        teacher: nn.Module | None = None,
        match_sigma_data: bool = True,
    ) -> None:
        """The boundary-condition parametrisation ``f(x, sigma_min) = x`` (Song et al. 2023, Eq. 5 / App. C)."""
        if boundary_condition:
            c = data_noise_scale(teacher, generator, match_sigma_data)
            wrap_boundary_condition(generator, c * float(sigma_min))

    # ------------------------------------------------------------------------------------------
    def sample_pair(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``n ~ U{0..N-2}``; returns ``(sigma_n, sigma_{n+1})`` with ``sigma_n > sigma_{n+1}`` (L174-186)."""
        n = torch.randint(0, self.num_scales - 1, (batch_size,))
        return self.sigmas[n].to(device), self.sigmas[n + 1].to(device)

    def teacher_step(self, x_t: Tensor, sigma: Tensor, sigma_next: Tensor, cond) -> Tensor:
        return heun_step(self.teacher, x_t, sigma, sigma_next, cond, self.guidance_scale)

    def student_cond(self, cond, batch_size: int, device):
        return cond

    def _lpips_fn(self, x: Tensor) -> nn.Module | None:
        # a frozen constant of the loss, not a role: the trainer places it via ``auxiliary_modules``
        return self.lpips

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        return {"lpips": self.lpips} if self.lpips is not None else {}

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x0, cond = batch.x0, batch.cond
        if x0 is None:
            raise ValueError(f"{type(self).__name__} needs real samples (Batch.x0)")
        sigma, sigma_next = self.sample_pair(x0.shape[0], x0.device)
        cond = self.student_cond(cond, x0.shape[0], x0.device)
        with torch.no_grad():
            x_t, _ = add_noise(x0, sigma)
            # (Alg. 2, l. 5) one teacher ODE step from sigma_n to sigma_{n+1}
            x_hat = self.teacher_step(x_t, sigma, sigma_next, cond)
        rng = RNGState(x0.device)
        pred = self.generator.denoise(x_t, sigma, cond)
        with torch.no_grad(), rng.replay():
            target = self.target_generator.denoise(x_hat, sigma_next, cond)
        # (Eq. 7) lambda(sigma_n) d(f_theta(x_t, sigma_n), f_theta-(x_hat, sigma_{n+1}))
        dist = consistency_distance(pred, target, self.distance, self.huber_c, self._lpips_fn(pred), self.noise_scale)
        loss = cd_weight(sigma, self.weighting, self.generator.sigma_data) * dist
        return LossOutput(loss, {"distance": float(dist.detach().mean()), "sigma_mean": float(sigma.mean())})

    def on_step_end(self, step: int) -> None:
        # (Alg. 2, l. 9) theta- <- stopgrad(mu theta- + (1 - mu) theta)
        ema_update(self.target_generator, self.generator, self.target_ema)

    def _cfg_factor(self) -> float:
        w = self.guidance_scale if self.guidance_scale is not None else getattr(self.teacher, "guidance_scale", 1.0)
        guided = can_guide(self.teacher) and w != 1.0
        return 2.0 if guided else 1.0

    def pass_count(self) -> PassCount:
        # student fwd+bwd, target fwd, two teacher forwards (Heun), each doubled by CFG
        return PassCount(forward=2.0 * self._cfg_factor() + 1.0, forward_grad=1.0, backward=1.0)
