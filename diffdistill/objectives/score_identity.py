"""Shared pieces of the objectives whose generator gradient flows *through* the teacher and the fake score.

SiD (Zhou et al. 2024, arXiv:2404.04057; official code ``mingyuanzhou/SiD`` ``training/sid_loss.py``) and SIM
(Luo et al. 2024, arXiv:2410.16794) share: the generator (one step from ``sigma_init z``, or one step of a k-step
student), the truncated Karras noise levels of the generator loss, the fake-score denoising loss on detached
generator samples, classifier-free guidance of either score (SiD-LSG, Zhou et al. 2024, arXiv:2406.01561), the
dropping of non-finite samples and the sanitising of the gradient that reaches the generator's samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffdistill.conventions import append_dims, as_sigma, cfg_combine
from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.models.teacher import Teacher, can_guide
from diffdistill.objectives.common import discrete_sigma_range, dsm_weight, lognormal_sigmas

# ----------------------------------------------------------------------------------------------------------------
# noise levels


def truncated_karras_sigmas(
    n: int,
    t_max: float,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """SiD's generator-loss noise levels: ``u ~ U[0, t_max / 1000]`` mapped through the Karras ramp
    ``sigma = (s_max^(1/rho) + (1 - u)(s_min^(1/rho) - s_max^(1/rho)))^rho`` (``mingyuanzhou/SiD``
    ``training/sid_loss.py``), so ``u = 0`` gives ``sigma_min`` and ``t_max = 800`` caps sigma at 24.41 (EDM range)."""
    u = torch.rand(n, device=device) * (t_max / 1000.0)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + (1 - u) * (lo - hi)) ** rho


SIGMA_SAMPLINGS = ("karras", "ddpm", "lognormal")


def ddpm_timestep_sigmas(schedule, n: int, t_min: int, t_max: int, device: torch.device | str = "cpu") -> Tensor:
    """SiD-LSG's noise levels on a DDPM-family teacher: ``t ~ U{t_min..t_max - 1}`` (``torch.randint(tmin, tmax)``,
    ``mingyuanzhou/SiD-LSG`` ``training/sid_training_loop.py``; 20, 980 there) and ``sigma_t = sqrt((1 - abar_t) /
    abar_t)`` of the teacher's schedule (``diffdistill.schedules.discrete.DDPMSchedule.sigmas``)."""
    t = torch.randint(int(t_min), int(t_max), (n,), device="cpu")
    return schedule.sigmas[t].to(device=device, dtype=torch.float32)


def check_ddpm_range(teacher: nn.Module, t_min: float, t_max: float, objective: str):
    """The teacher's DDPM schedule, after checking ``t_min < t_max <= T`` (integers); one clear error for a teacher
    without discrete timesteps (EDM, flow: use ``sigma_sampling: karras``)."""
    from diffdistill.models.consistency import discrete_vp_schedule

    schedule = discrete_vp_schedule(teacher)
    if schedule is None:
        raise ValueError(
            f"{objective}: sigma_sampling=ddpm draws DDPM timesteps, but the teacher ({type(teacher).__name__}) has no "
            "DDPM schedule (an EDM or flow teacher): use sigma_sampling=karras"
        )
    T = len(schedule.sigmas)
    for key, v in (("t_min", t_min), ("t_max", t_max)):
        if float(v) != int(v):
            raise ValueError(f"{objective}: with sigma_sampling=ddpm, {key} is a DDPM timestep (an integer), got {v}")
    if not 0 <= int(t_min) < int(t_max) <= T:
        raise ValueError(
            f"{objective}: with sigma_sampling=ddpm, need 0 <= t_min < t_max <= {T} (t ~ U{{t_min..t_max - 1}}), got "
            f"t_min={t_min}, t_max={t_max}"
        )
    return schedule


# ----------------------------------------------------------------------------------------------------------------
# the generator's samples


def generate(generator: nn.Module, batch: Batch, num_steps: int, grad: bool) -> tuple[Tensor, int]:
    """Generator samples ``x_g`` and the (0-based) student step that produced them.

    One step (``num_steps = 1``): ``x_g = G(sigma_init z, sigma_init)``. A k-step student (its
    ``sampling_sigmas`` has ``k`` entries) draws ``j ~ U{0..k-1}`` and returns the output of step ``j`` of its
    multistep sampler (Song et al. 2023, Alg. 1: denoise, re-noise to the next sigma with fresh noise): steps before
    ``j`` run without a graph, step ``j`` with one when ``grad``. Every intermediate output is an estimate of a clean
    sample, so each is trained by the same loss (the backward-simulation idea of DMD2, Yin et al. 2024, §4.5).
    """
    device = next(generator.parameters()).device
    z = torch.randn(batch.batch_size, *generator.sample_shape, device=device)
    sigmas = generator.sampling_sigmas[:num_steps] if num_steps > 1 else [generator.sigma_init]
    j = int(torch.randint(len(sigmas), ())) if len(sigmas) > 1 else 0
    floor = float(getattr(generator, "renoise_floor", 0.0))
    x = generator.noise_input(z, sigmas[0]) if hasattr(generator, "noise_input") else sigmas[0] * z
    for i in range(j + 1):
        with torch.set_grad_enabled(grad and i == j):
            x0 = generator.denoise(x, as_sigma(sigmas[i], x.shape[0], device), batch.cond)
        if i < j:  # (Song et al. 2023, Alg. 1, line 5) re-noise to the next sigma
            x = x0 + math.sqrt(max(sigmas[i + 1] ** 2 - floor**2, 0.0)) * torch.randn_like(x0)
    return x0, j


def check_num_steps(generator: nn.Module, num_steps: int) -> None:
    """A k-step objective needs a student with ``k`` sampling sigmas (the grid it is trained and sampled on)."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    have = len(getattr(generator, "sampling_sigmas", [None]))
    if num_steps > 1 and have != num_steps:
        raise ValueError(
            f"num_steps={num_steps} needs student.sampling_sigmas with {num_steps} descending sigmas (got {have}), "
            "e.g. student.sampling_sigmas=[2.5,1.0]"
        )


# ----------------------------------------------------------------------------------------------------------------
# scores with guidance, optionally checkpointed


def guided_denoise(model: nn.Module, x: Tensor, sigma: Tensor, cond: Conditioning, w: float | None) -> Tensor:
    """``x0_hat`` of the teacher or the fake score with CFG ``x0_u + w (x0_c - x0_u)`` (w = 1: none).

    The teacher applies its own guidance (``w = None``: its configured scale). For the fake score SiD-LSG
    (arXiv:2406.01561, §3) guides it like the teacher, from its own conditional and null-class outputs, batched as
    one forward of ``[cond; uncond]``.
    """
    if isinstance(model, Teacher):
        return model(x, sigma, cond, guidance_scale=w)
    uncond = model.uncond(cond) if (w is not None and w != 1.0) else None
    if uncond is None:
        return model(x, sigma, cond.without_negative())
    both = model(torch.cat([x, x]), torch.cat([sigma, sigma]), Conditioning.cat([cond.without_negative(), uncond]))
    x0_c, x0_u = both.chunk(2)
    return cfg_combine(x0_u, x0_c, w)


def score_forward(
    model: nn.Module, x: Tensor, sigma: Tensor, cond: Conditioning, w: float | None, use_checkpoint: bool
) -> Tensor:
    """:func:`guided_denoise`, under activation checkpointing when asked and a graph is being built: the forward's
    activations are not kept, the backward recomputes them (one more forward, less memory)."""
    if use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
        return checkpoint(guided_denoise, model, x, sigma, cond, w, use_reentrant=False)
    return guided_denoise(model, x, sigma, cond, w)


def guidance_passes(model: nn.Module, w: float | None) -> float:
    """Forwards one guided call costs (2 with CFG on a class-conditional model, else 1)."""
    if w is None:
        w = getattr(model, "guidance_scale", 1.0)
    return 2.0 if (can_guide(model) and w != 1.0) else 1.0


# ----------------------------------------------------------------------------------------------------------------
# numerical guards (the official SiD code drops samples with NaNs and replaces non-finite gradients)


def finite_samples(*xs: Tensor) -> Tensor:
    """``[B]`` mask of the samples whose every element is finite in all of ``xs``."""
    keep = torch.ones(xs[0].shape[0], dtype=torch.bool, device=xs[0].device)
    for x in xs:
        keep &= torch.isfinite(x.detach()).flatten(1).all(1)
    return keep


def keep_samples(x: Tensor, keep: Tensor) -> Tensor:
    """``x`` with the dropped samples replaced by zeros (their loss is 0 and no gradient flows back to them)."""
    return torch.where(append_dims(keep, x.ndim), x, torch.zeros_like(x))


def sanitize_gradient(x: Tensor) -> Tensor:
    """Replace non-finite entries of the gradient that flows back into ``x`` by 0 (a dropped sample may still
    backpropagate ``0 * inf`` through a network); ``x`` itself is unchanged."""
    if x.requires_grad:
        x.register_hook(lambda g: torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0))
    return x


# ----------------------------------------------------------------------------------------------------------------
# the fake score's loss


def fake_score_loss(
    fake_score: nn.Module,
    x_g: Tensor,
    cond: Conditioning,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    guidance_scale: float = 1.0,
    sigma: Tensor | None = None,
    noise: Tensor | None = None,
    weighting: str = "edm",
    x0_fake: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Per-sample ``lambda(sigma) sum ||f_psi(x_g + sigma n, sigma) - x_g||^2`` on detached samples, ``ln sigma ~
    N(P_mean, P_std^2)`` (clamped to a DDPM fake score's range), ``lambda = 1/sigma^2 + 1/sigma_d^2`` (SiD Eq. 9
    with EDM's weighting; summed over the sample's elements as ``mingyuanzhou/SiD`` does). Samples with non-finite
    values count 0. ``guidance_scale`` is SiD-LSG's kappa_1: the fake score's guided prediction is what it fits.
    ``sigma`` and ``noise`` given: those are used (SiDA noises its real samples with the same ones). ``weighting``
    (:func:`diffdistill.objectives.common.dsm_weight`): ``"eps"`` gives SiD-LSG's eps-MSE ``||eps_hat - eps||^2``
    summed over elements. ``x0_fake``: the fake score's (guided) output at ``x_g + sigma noise``, already computed
    by the caller (with ``sigma`` and ``noise``; SiDA reads the discriminator's taps from the same forward).
    """
    x_g = x_g.detach()
    if sigma is None:  # inside a DDPM fake score's sigma range (its adapter would clamp only the timestep)
        sigma = lognormal_sigmas(x_g.shape[0], P_mean, P_std, x_g.device, discrete_sigma_range(fake_score))
    noise = torch.randn_like(x_g) if noise is None else noise
    if x0_fake is None:
        x_t = x_g + append_dims(sigma, x_g.ndim) * noise
        x0_fake = guided_denoise(fake_score, x_t, sigma, cond, guidance_scale)
    keep = finite_samples(x_g, x0_fake)
    # (SiD Eq. 9) EDM-weighted denoising score matching on generator samples
    err = (keep_samples(x0_fake, keep) - keep_samples(x_g, keep)).pow(2).flatten(1).sum(1)
    loss = dsm_weight(sigma, float(fake_score.sigma_data), weighting) * err
    return loss, {"fake_dsm": float(loss.detach().mean()), "fake_dropped": float((~keep).sum())}
