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
    check_weighting,
    denoising_score_matching_loss,
    dm_timestep_grid,
    gradient_injection_loss,
    karras_index_sigmas,
    per_sample_mean,
)
from diffdistill.schedules.karras import KarrasSchedule


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor, normalize: bool = True, float64: bool = False) -> Tensor:
    """DMD's per-element gradient ``g = (x0_fake - x0_real) / mean_{CHW}|x - x0_real|`` (DMD Eq. 8).

    With ``normalize=False`` this is ``sigma^2 (s_real - s_fake)`` up to the sign convention, i.e. the
    unnormalised KL gradient direction. NaNs (e.g. a zero normaliser) are zeroed, as in the released code.
    ``float64``: form the normaliser and the quotient in float64 and zero every sample that has a non-finite
    element (per-sample masking, as the rCM/DMD2 releases do), then cast back to ``x``'s dtype.
    """
    if float64:
        x, x0_real, x0_fake = x.double(), x0_real.double(), x0_fake.double()
    g = x0_fake - x0_real
    if normalize:
        weight = per_sample_mean((x - x0_real).abs())  # [B]
        g = g / weight.reshape(-1, *([1] * (x.ndim - 1)))
    if float64:
        finite = torch.isfinite(g.flatten(1)).all(1)
        return torch.where(finite.reshape(-1, *([1] * (g.ndim - 1))), g, torch.zeros_like(g)).float()
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


class TeacherPairs:
    """Noise/image pairs of the teacher's ODE (DMD v1 §3.3, Eq. 9), generated once and cached.

    ``count`` pairs from a private seeded generator (the training RNG streams are untouched, so a resumed run
    regenerates the same pairs), ``steps`` Heun steps of the teacher from ``sigma_max z``; kept in memory and, with
    ``cache`` set, saved to / loaded from that ``.pt`` file.
    """

    def __init__(self, count: int, steps: int = 18, seed: int = 0, cache: str | None = None):
        if count < 1 or steps < 1:
            raise ValueError(f"regression_pairs and regression_steps must be >= 1, got {count}, {steps}")
        self.count, self.steps, self.seed, self.cache = int(count), int(steps), int(seed), cache
        self.pairs: dict[str, Tensor] | None = None

    @torch.no_grad()
    def generate(self, teacher, shape: tuple[int, ...], device, guidance_scale=None, chunk: int = 256) -> None:
        from pathlib import Path

        from diffdistill.sampling import heun_sample
        from diffdistill.schedules.karras import karras_sigmas

        if self.cache and Path(self.cache).exists():
            self.pairs = {k: v.to(device) for k, v in torch.load(self.cache, weights_only=True).items()}
            if self.pairs["z"].shape != (self.count, *shape):
                raise ValueError(
                    f"objective.regression_cache '{self.cache}' holds pairs of shape {tuple(self.pairs['z'].shape)}, "
                    f"not {(self.count, *shape)}: delete it or point regression_cache elsewhere"
                )
            return
        g = torch.Generator().manual_seed(self.seed)
        z = torch.randn(self.count, *shape, generator=g)
        k = getattr(teacher, "num_classes", None)
        labels = torch.randint(k, (self.count,), generator=g) if k else None
        sigmas = karras_sigmas(self.steps, teacher.sigma_min, teacher.sigma_max, append_zero=True).to(device)
        images = []
        for i in range(0, self.count, chunk):
            zi = z[i : i + chunk].to(device)
            cond = Conditioning(class_labels=labels[i : i + chunk].to(device)) if labels is not None else Conditioning()
            fn = lambda x, s, c: teacher(x, s, c, guidance_scale=guidance_scale)  # noqa: E731
            images.append(heun_sample(fn, zi * sigmas[0], sigmas, cond))
        self.pairs = {"z": z.to(device), "x0": torch.cat(images)}
        if labels is not None:
            self.pairs["labels"] = labels.to(device)
        if self.cache:
            Path(self.cache).parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in self.pairs.items()}, self.cache)

    def draw(self, n: int) -> tuple[Tensor, Tensor, Conditioning]:
        """``n`` pairs ``(z, x0, cond)`` drawn with replacement (the training RNG)."""
        idx = torch.randint(self.count, (n,)).to(self.pairs["z"].device)
        labels = self.pairs.get("labels")
        cond = Conditioning(class_labels=labels[idx]) if labels is not None else Conditioning()
        return self.pairs["z"][idx], self.pairs["x0"][idx], cond


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
        fake_weighting: ``"edm"`` (``1/sigma^2 + 1/sigma_d^2``, DMD2 EDM code), ``"eps"`` (``1/sigma^2``: the eps-MSE
            of DMD2's SD code) or ``"none"``.
        critic_steps_per_generator_step: 1 in DMD (v1); DMD2 uses 5 (ImageNet) / 10 (SD1.5).
        normalize: use the per-sample normaliser (DMD Eq. 8); ``False`` gives the raw KL gradient.
        regression_weight: weight of DMD v1's regression loss on teacher ODE pairs (paper: 0.25 with LPIPS);
            0 (default here) switches it off, which is DMD2's choice and keeps the run free of the pair generation.
        regression_pairs, regression_steps, regression_seed, regression_cache: the pair set (see
            :class:`TeacherPairs`).
        regression_distance: ``"lpips"`` (paper; needs ``lpips_weights``) or ``"l2"``.
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
        regression_weight: float = 0.0,
        regression_pairs: int = 1024,
        regression_steps: int = 18,
        regression_distance: str = "lpips",
        regression_seed: int = 0,
        regression_cache: str | None = None,
        lpips_net: str = "vgg",
        lpips_weights: str | None = None,
    ):
        check_weighting("fake_weighting", fake_weighting)
        if not 0.0 <= min_step_percent <= max_step_percent <= 1.0:
            raise ValueError(
                f"need 0 <= min_step_percent <= max_step_percent <= 1, got {min_step_percent}, {max_step_percent}"
            )
        self.teacher, self.generator, self.fake_score = teacher, generator, fake_score
        self.sigmas, self.k_min, self.k_max = dm_timestep_grid(schedule, teacher, min_step_percent, max_step_percent)
        self.real_guidance_scale = real_guidance_scale
        self.fake_weighting, self.normalize = fake_weighting, normalize
        self.update_schedule = UpdateSchedule(critic_steps_per_generator_step, generator_warmup_steps)
        if regression_weight < 0:
            raise ValueError(f"regression_weight must be >= 0, got {regression_weight}")
        if regression_distance not in ("lpips", "l2"):
            raise ValueError(f"regression_distance must be 'lpips' or 'l2', got {regression_distance!r}")
        self.regression_weight, self.regression_distance = float(regression_weight), regression_distance
        self.pairs = None
        self.lpips = None
        if self.regression_weight > 0:
            self.pairs = TeacherPairs(regression_pairs, regression_steps, regression_seed, regression_cache)
            if regression_distance == "lpips":
                from diffdistill.objectives.consistency import build_lpips

                self.lpips = build_lpips(lpips_net, lpips_weights)

    def auxiliary_modules(self) -> dict:
        return {"lpips": self.lpips} if self.lpips is not None else {}

    def regression_loss(self, n: int, device) -> Tensor:
        """DMD v1's regression of the one-step student onto the teacher's ODE output from the same noise."""
        from diffdistill.objectives.consistency import consistency_distance

        if self.pairs.pairs is None:
            self.pairs.generate(self.teacher, tuple(self.generator.sample_shape), device, self.real_guidance_scale)
        z, x0_ref, cond = self.pairs.draw(n)
        # (DMD Eq. 9) L_reg = d(G(z_ref), y_ref), LPIPS in the paper
        return consistency_distance(self.generator(z, cond), x0_ref, self.regression_distance, lpips_fn=self.lpips)

    def with_regression(self, loss: Tensor, logs: dict[str, float], n: int, device) -> Tensor:
        """``loss`` plus ``regression_weight`` times the regression term when it is on (its value into ``logs``)."""
        if self.regression_weight <= 0:
            return loss
        reg = self.regression_loss(n, device)
        logs["regression_loss"] = float(reg.detach().mean())
        # (DMD Eq. 9) regression onto the teacher's ODE pairs
        return loss + self.regression_weight * reg

    @property
    def regression_passes(self) -> float:
        """Generator fwd+bwd passes of the regression per generator update (its pairs are made once, not counted)."""
        return 1.0 if self.regression_weight > 0 else 0.0

    # ------------------------------------------------------------------------------------------
    def generate(self, batch: Batch) -> tuple[Tensor, Conditioning]:
        cond = batch.cond
        n = batch.batch_size
        device = batch.x0.device if batch.x0 is not None else next(self.generator.parameters()).device
        z = torch.randn(n, *self.generator.sample_shape, device=device)
        return self.generator(z, cond), cond

    float64: bool = False  # DMD2 forms the normalised gradient in float64 with per-sample masking

    def dm_sigmas(self, n: int, device) -> Tensor:
        """Noise levels of the distribution-matching gradient (DMD2: ``k ~ U{k_min..k_max}`` on the Karras grid)."""
        return karras_index_sigmas(self.sigmas, n, self.k_min, self.k_max, device)

    def fake_sigmas(self, n: int, device) -> Tensor:
        """Noise levels of the fake-score loss (DMD2: the full Karras grid)."""
        return karras_index_sigmas(self.sigmas, n, 0, len(self.sigmas) - 1, device)

    def dm_gradient(
        self, x: Tensor, x_t: Tensor, sigma: Tensor, cond: Conditioning, x0_real: Tensor, x0_fake: Tensor
    ) -> Tensor:
        """The per-element gradient injected into generator samples ``x``, from both scores at ``x_t = x + sigma
        eps`` (DMD Eq. 8; variants override). Called without a graph."""
        return dmd_gradient(x, x0_real, x0_fake, self.normalize, self.float64)

    def inject(self, x: Tensor, g: Tensor) -> Tensor:
        """Per-sample loss whose gradient w.r.t. ``x`` is ``g`` up to DMD2's constant (docs/invariants.md §5)."""
        return gradient_injection_loss(x, g)

    def distribution_matching_loss(self, x: Tensor, cond: Conditioning) -> tuple[Tensor, dict[str, float]]:
        """Per-sample surrogate loss of the DM gradient at generator samples ``x`` (with graph), and its logs."""
        with torch.no_grad():
            sigma = self.dm_sigmas(x.shape[0], x.device)
            x_t, _ = add_noise(x.detach(), sigma)
            # (DMD Eq. 7) real and fake scores at the same noisy point, no backprop through either
            x0_real = self.teacher(x_t, sigma, cond, guidance_scale=self.real_guidance_scale)
            x0_fake = self.fake_score(x_t, sigma, cond)
            # (DMD Eq. 8) per-sample normalised gradient
            g = self.dm_gradient(x.detach(), x_t, sigma, cond, x0_real, x0_fake)
        # inject g through the surrogate MSE (as DMD2's code does; docs/invariants.md §5)
        loss = self.inject(x, g)
        return loss, {"dm_grad_norm": float(g.flatten(1).norm(dim=1).mean()), "dm_sigma_mean": float(sigma.mean())}

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x, cond = self.generate(batch)
        loss, logs = self.distribution_matching_loss(x, cond)
        batch.scratch["dmd_generated"] = (x.detach(), cond)
        return LossOutput(self.with_regression(loss, logs, x.shape[0], x.device), logs)

    def critic_loss(self, batch: Batch, step: int) -> LossOutput:
        cached = batch.scratch.pop("dmd_generated", None)
        if cached is not None:
            x, cond = cached  # DMD2 re-uses the images generated in the same iteration
        else:
            with torch.no_grad():
                x, cond = self.generate(batch)
        # (DMD Eq. 6) fake-score denoising loss over the full sigma range
        sigma = self.fake_sigmas(x.shape[0], x.device)
        loss = denoising_score_matching_loss(self.fake_score, x.detach(), sigma, cond, self.fake_weighting)
        return LossOutput(loss, {"fake_dsm": float(loss.detach().mean())})

    def pass_count(self) -> PassCount:
        r = self.update_schedule.critic_steps_per_generator_step
        cfg = 2.0 if (self.real_guidance_scale or getattr(self.teacher, "guidance_scale", 1.0)) != 1.0 else 1.0
        # generator step (every r-th iteration): G fwd+bwd, teacher fwd (x2 with CFG), fake fwd
        reg = self.regression_passes
        gen = PassCount(forward=cfg + 1.0, forward_grad=1.0 + reg, backward=1.0 + reg)
        # critic step (every iteration): fake fwd+bwd (+ a no-grad G forward when the cache is empty)
        crit_fwd = 0.0 if r == 1 else 1.0
        return PassCount(
            forward=gen.forward / r + crit_fwd * (r - 1) / r,
            forward_grad=gen.forward_grad / r + 1.0,
            backward=gen.backward / r + 1.0,
        )
