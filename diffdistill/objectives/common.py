"""Shared math of the objectives, as pure functions (docs/architecture.md §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffdistill.conventions import append_dims, noise_scale
from diffdistill.models.denoiser import edm_loss_weight


def per_sample_mean(x: Tensor) -> Tensor:
    """Mean over all but the batch dim: ``[B, ...] -> [B]``."""
    return x.flatten(1).mean(1)


def add_noise(x0: Tensor, sigma: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Forward process of the EDM convention ``x = x0 + sigma eps``; returns ``(x, eps)``."""
    eps = torch.randn_like(x0) if noise is None else noise
    return x0 + append_dims(sigma, x0.ndim) * eps, eps


def gradient_injection_loss(x: Tensor, grad: Tensor) -> Tensor:
    """Surrogate ``1/2 mean((x - sg(x - g))^2)`` whose gradient w.r.t. ``x`` is ``g / numel``.

    As in DMD2's official code (``tianweiy/DMD2``, ``main/edm/edm_guidance.py``); see docs/invariants.md §5.
    Returned per sample (mean over the sample's elements), so the trainer's batch mean reproduces DMD2's
    global mean exactly.
    """
    target = (x - grad).detach()
    return 0.5 * per_sample_mean((x - target) ** 2)


DSM_WEIGHTINGS = ("edm", "eps", "none")


def dsm_weight(sigma: Tensor, sigma_data: float, weighting: str = "edm") -> Tensor:
    """``lambda(sigma)`` of a denoising loss on the ``x0`` error, ``[B]``.

    ``"edm"``: ``1/sigma^2 + 1/sigma_d^2`` (EDM Table 1; DMD2's EDM code). ``"eps"``: ``1/sigma^2``, which makes
    ``lambda ||x0_hat - x0||^2`` the eps-prediction MSE ``||eps_hat - eps||^2`` (``eps_hat = (x - x0_hat) / sigma``;
    DMD2's SD code ``main/sd_guidance.py``, SiD-LSG ``training/sid_training_loop.py``; for v-prediction SiD-LSG's
    ``snr / (snr + 1) ||v_hat - v||^2`` is the same number). ``"none"``: 1.
    """
    if weighting == "edm":
        return edm_loss_weight(sigma, sigma_data)
    if weighting == "eps":
        return sigma.pow(-2)
    if weighting == "none":
        return torch.ones_like(sigma)
    raise ValueError(f"unknown weighting '{weighting}' (one of {DSM_WEIGHTINGS})")


def check_weighting(key: str, weighting: str) -> None:
    """One clear error for a weighting name outside :data:`DSM_WEIGHTINGS`."""
    if weighting not in DSM_WEIGHTINGS:
        raise ValueError(f"unknown {key} '{weighting}' (one of {DSM_WEIGHTINGS})")


def denoising_score_matching_loss(denoiser, x0: Tensor, sigma: Tensor, cond, weighting: str = "edm") -> Tensor:
    """Per-sample fake-score loss ``lambda(sigma) mean ||D(x0 + sigma eps, sigma) - x0||^2`` (EDM Eq. 8).

    ``weighting`` (:func:`dsm_weight`): ``"edm"`` (``1/sigma^2 + 1/sigma_d^2``), ``"eps"`` (``1/sigma^2``: the
    eps-MSE of DMD2's SD code) or ``"none"`` (1).
    """
    check_weighting("weighting", weighting)
    x, _ = add_noise(x0, sigma)
    return weighted_denoising_error(denoiser(x, sigma, cond), x0, sigma, denoiser.sigma_data, weighting)


def weighted_denoising_error(x0_hat: Tensor, x0: Tensor, sigma: Tensor, sigma_data: float, weighting: str) -> Tensor:
    """Per-sample ``lambda(sigma) mean ||x0_hat - x0||^2`` of a denoiser output already computed (EDM Eq. 8; the
    weights of :func:`denoising_score_matching_loss`)."""
    err = per_sample_mean((x0_hat - x0) ** 2)
    if weighting == "none":
        return err
    return dsm_weight(sigma, sigma_data, weighting) * err


def karras_index_sigmas(sigmas_ascending: Tensor, batch: int, k_min: int, k_max: int, device) -> Tensor:
    """Draw ``k ~ U{k_min..k_max}`` and return ``sigma_k`` of an ascending grid (DMD2's timestep sampling)."""
    k = torch.randint(k_min, k_max + 1, (batch,), device="cpu")
    return sigmas_ascending[k].to(device=device, dtype=torch.float32)


def dm_timestep_grid(schedule, teacher, min_step_percent: float, max_step_percent: float) -> tuple[Tensor, int, int]:
    """DMD2's distribution-matching timesteps: the ascending grid of ``schedule`` and the index range
    ``[min_step_percent T, max_step_percent T]``. Without a schedule: a DDPM-family teacher's own ``T`` timesteps
    (DMD2's SD code draws ``t ~ U{20..980}`` of 1000, ``main/sd_guidance.py``), else a 1000-level Karras grid over the
    teacher's noise range."""
    from diffdistill.models.consistency import discrete_vp_schedule
    from diffdistill.schedules.discrete import DDPMSchedule
    from diffdistill.schedules.karras import KarrasSchedule

    schedule = schedule or discrete_vp_schedule(teacher) or KarrasSchedule(teacher.sigma_min, teacher.sigma_max)
    if isinstance(schedule, DDPMSchedule):
        sigmas = schedule.sigmas.float()  # ascending in t
    else:
        sigmas = schedule.sigmas(ascending=True)  # sigma_0 = sigma_min ... sigma_{T-1} = sigma_max
    T = len(sigmas)
    k_min, k_max = int(min_step_percent * T), int(max_step_percent * T)
    if not 0 <= k_min <= k_max < T:
        raise ValueError(
            f"need 0 <= min_step_percent <= max_step_percent < 1, got {min_step_percent}, {max_step_percent}"
        )
    return sigmas, k_min, k_max


def backward_simulation(
    denoise,
    x: Tensor,
    sigma: Tensor,
    n_steps: int,
    cond,
    next_sigma,
    grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """Few-step student samples as training inputs (DMD2 §4.4, arXiv:2405.14867; rCM's score regulariser).

    From ``x`` at ``sigma`` (pure noise ``sigma_init z``), ``n_steps`` calls ``x0 = denoise(x, sigma, cond)``; between
    calls the sample is re-noised, ``x = x0 + sigma' eps`` with fresh noise at ``sigma' = next_sigma(i, sigma)``.
    Only the last call builds a graph (when ``grad``), so the gradient reaches the student through that call alone.
    Returns ``(x0, sigma)`` of the last call.
    """
    if n_steps < 1:
        raise ValueError(f"backward simulation needs at least one student step, got {n_steps}")
    for i in range(n_steps):
        last = i == n_steps - 1
        with torch.set_grad_enabled(grad and last):
            x0 = denoise(x, sigma, cond)
        if not last:
            sigma = next_sigma(i, sigma)
            x, _ = add_noise(x0.detach(), sigma)
    return x0, sigma


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """Pseudo-Huber on the flattened per-sample norm ``sqrt(||d||^2 + c^2) - c`` (Song & Dhariwal 2023, Eq. 10)."""
    return (diff.flatten(1).pow(2).sum(1) + c**2).sqrt() - c


def elementwise_pseudo_huber(diff: Tensor, c: float = 0.001) -> Tensor:
    """Per-sample mean of the elementwise pseudo-Huber ``sqrt(d^2 + c^2) - c`` (diffusers' LCM scripts,
    ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``, ``--loss_type huber``: the batch mean of this
    is their ``torch.mean(torch.sqrt((pred - target) ** 2 + c ** 2) - c)``)."""
    return per_sample_mean((diff.pow(2) + c**2).sqrt() - c)


def sample_noise(shape: tuple[int, ...], batch: int, device, dtype=torch.float32) -> Tensor:
    return torch.randn(batch, *shape, device=device, dtype=dtype)


def data_noise_scale(teacher, generator=None, match: bool = True) -> float:
    """``c = sigma_data / 0.5`` of the teacher (the generator's when there is no teacher): the factor by which a
    paper's noise levels, stated for ``sigma_data = 0.5``, are scaled (:func:`diffdistill.conventions.noise_scale`).
    """
    source = teacher if getattr(teacher, "sigma_data", None) is not None else generator
    sigma_data = getattr(source, "sigma_data", None)
    return noise_scale(sigma_data, match) if match and sigma_data is not None else 1.0


def discrete_sigma_range(model) -> tuple[float, float] | None:
    """``(sigma_min, sigma_max)`` of a discrete-time (DDPM) network, whose timesteps end there (an SD UNet:
    [0.029, 14.6]); ``None`` for continuous-time networks (EDM, flow), which take any ``sigma > 0``."""
    from diffdistill.models.consistency import discrete_vp_schedule

    schedule = discrete_vp_schedule(model)
    if schedule is None:
        return None
    sigmas = schedule.sigmas.double()
    return float(sigmas.min()), float(sigmas.max())


def lognormal_sigmas(
    n: int,
    P_mean: float,
    P_std: float,
    device: torch.device | str = "cpu",
    sigma_range: tuple[float, float] | None = None,
) -> Tensor:
    """EDM's training density ``ln sigma ~ N(P_mean, P_std^2)`` (Karras et al. 2022, Table 1), the one log-normal
    draw of every objective (EDM's, ECT's, sCM's ``tau``, SiD's / SIM's fake-score loss, Diff-Instruct's).

    ``sigma_range`` (:func:`discrete_sigma_range`; ``None``: unbounded) clamps the draws to a DDPM network's noise
    range: the density puts mass beyond its last timestep, where the adapter would clamp the timestep but not the
    noise level. Continuous-time networks get the plain law, draw for draw."""
    sigma = (P_mean + P_std * torch.randn(n, device=device)).exp()
    return sigma if sigma_range is None else sigma.clamp(*sigma_range)
