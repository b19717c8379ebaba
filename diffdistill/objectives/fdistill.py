"""f-distill: distribution matching under an f-divergence.

Xu et al., "One-step Diffusion Models with f-Divergence Distribution Matching" (2025, arXiv:2502.15681).
DMD2 (:class:`~diffdistill.objectives.dmd2.DMD2`) with its distribution-matching gradient weighted per sample:

    g_f = h(r) g,    h(r) = f''(r) r^2,    r = p_sigma(x_t) / q_sigma(x_t) ~ exp(D(x_t))   (paper §3)

``g`` is DMD2's normalised gradient at ``x_t = x + sigma eps``, ``D`` the real-vs-generated discriminator logit at
the same ``(x_t, sigma)`` (at the optimum of the non-saturating loss ``D = log p/q``), so the discriminator that
DMD2 trains for its GAN term also estimates the density ratio. Before weighting: the logit is clamped to
``+-logit_clamp``, ``r`` clipped to ``[ratio_min, ratio_max]``, optionally divided by a running mean of ``r`` per
noise-level bin, and ``h`` divided by its batch mean (no gradient through any of it). ``h``, up to constants:

    reverse_kl 1 (DMD2),  forward_kl r,  js r / (1 + r),  squared_hellinger sqrt(r),  jeffreys 1 + r,  neyman 1 / r
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffdistill.conventions import append_dims
from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.models.discriminator import feature_pass_cost
from diffdistill.objectives.base import LossOutput, Paper, PassCount, register_objective
from diffdistill.objectives.dmd2 import DMD2
from diffdistill.schedules.karras import KarrasSchedule

# h(r) = f''(r) r^2 of each f-divergence, constants dropped (h is normalised to batch mean 1)
WEIGHTS = {
    "reverse_kl": lambda r: torch.ones_like(r),
    "forward_kl": lambda r: r,
    "js": lambda r: r / (1.0 + r),
    "squared_hellinger": lambda r: r.sqrt(),
    "jeffreys": lambda r: 1.0 + r,
    "neyman": lambda r: 1.0 / r,
}


def f_weight(r: Tensor, divergence: str) -> Tensor:
    """``h(r) = f''(r) r^2`` of ``divergence`` (a key of :data:`WEIGHTS`), up to a constant factor."""
    if divergence not in WEIGHTS:
        raise ValueError(f"objective.divergence must be one of {sorted(WEIGHTS)}, got {divergence!r}")
    return WEIGHTS[divergence](r)


def density_ratio(logits: Tensor, logit_clamp: float | None = 10.0, ratio_range=(0.1, 20.0)) -> Tensor:
    """``r = exp(clamp(D))`` clipped to ``ratio_range`` (``None`` entries: no clamp / no clip)."""
    if logit_clamp is not None:
        logits = logits.clamp(-logit_clamp, logit_clamp)
    r = logits.float().exp()
    lo, hi = ratio_range
    return r if lo is None and hi is None else r.clamp(min=lo, max=hi)


@register_objective
class FDistill(DMD2):
    """f-distill (see the module docstring).

    Args:
        teacher, generator, fake_score, discriminator, and DMD2's hyperparameters: as in :class:`DMD2`. The GAN
            term is required (``gan_generator_weight > 0`` and ``gan_discriminator_weight > 0``): the
            discriminator must be trained for ``r`` to estimate the density ratio.
        divergence: the f-divergence (``js`` by default; ``reverse_kl`` gives DMD2 exactly).
        logit_clamp: the logit is clamped to ``[-logit_clamp, logit_clamp]`` before ``exp`` (10).
        ratio_min, ratio_max: ``r`` is clipped to this range (0.1, 20).
        ratio_normalization: divide ``r`` by its running mean in its noise-level bin (off by default).
        ratio_bins: the bins (equal ranges of the DM timestep index), 10.
        ratio_decay: the running mean's EMA decay (per generator update).
        **regression: DMD v1's ``regression_*`` / ``lpips_*`` options, as in :class:`DMD2` (off by default).
    """

    name = "fdistill"
    paper = Paper("One-step Diffusion Models with f-Divergence Distribution Matching", "2502.15681", "Xu et al.", 2025)

    def __init__(
        self,
        teacher: nn.Module,
        generator: nn.Module,
        fake_score: nn.Module,
        discriminator: nn.Module,
        schedule: KarrasSchedule | None = None,
        min_step_percent: float = 0.02,
        max_step_percent: float = 0.98,
        real_guidance_scale: float | None = None,
        fake_weighting: str = "edm",
        critic_steps_per_generator_step: int = 5,
        generator_warmup_steps: int = 0,
        gan_generator_weight: float = 3e-3,
        gan_discriminator_weight: float = 1e-2,
        gan_loss: str = "ns",
        gan_max_step_percent: float = 1.0,
        discriminator_heads: dict | None = None,
        r1_weight: float = 0.0,
        r1_kind: str = "exact",
        r1_noise_std: float = 0.1,
        backward_simulation: bool = True,
        divergence: str = "js",
        logit_clamp: float = 10.0,
        ratio_min: float = 0.1,
        ratio_max: float = 20.0,
        ratio_normalization: bool = False,
        ratio_bins: int = 10,
        ratio_decay: float = 0.99,
        **regression: Any,
    ):
        super().__init__(
            teacher,
            generator,
            fake_score,
            discriminator,
            schedule,
            min_step_percent,
            max_step_percent,
            real_guidance_scale,
            fake_weighting,
            critic_steps_per_generator_step,
            generator_warmup_steps,
            gan_generator_weight,
            gan_discriminator_weight,
            gan_loss,
            gan_max_step_percent,
            discriminator_heads,
            r1_weight,
            r1_kind,
            r1_noise_std,
            backward_simulation,
            **regression,
        )
        f_weight(torch.ones(1), divergence)  # checks the name
        if divergence != "reverse_kl" and not (gan_generator_weight > 0 and gan_discriminator_weight > 0):
            raise ValueError(
                "objective.gan_discriminator_weight and objective.gan_generator_weight must be > 0 for f-distill: "
                "its density ratio comes from the trained discriminator (or use divergence=reverse_kl, DMD2)"
            )
        if not logit_clamp > 0:
            raise ValueError(f"objective.logit_clamp must be > 0, got {logit_clamp}")
        if not 0 < ratio_min < ratio_max:
            raise ValueError(f"need 0 < objective.ratio_min < objective.ratio_max, got {ratio_min}, {ratio_max}")
        if ratio_bins < 1:
            raise ValueError(f"objective.ratio_bins must be >= 1, got {ratio_bins}")
        if not 0.0 <= ratio_decay < 1.0:
            raise ValueError(f"objective.ratio_decay must lie in [0, 1), got {ratio_decay}")
        self.divergence, self.logit_clamp = divergence, float(logit_clamp)
        self.ratio_range = (float(ratio_min), float(ratio_max))
        self.ratio_normalization, self.ratio_bins, self.ratio_decay = bool(ratio_normalization), ratio_bins, ratio_decay
        # the running mean of r per bin (used, and updated once per iteration from all micro-batches and processes)
        self.ratio_mean = torch.ones(ratio_bins, dtype=torch.float64)
        self.ratio_seen = torch.zeros(ratio_bins, dtype=torch.float64)
        self._pending = torch.zeros(2, ratio_bins, dtype=torch.float64)  # this iteration's sum of r and count

    def ratio_bin(self, sigma: Tensor) -> Tensor:
        """The bin of each noise level: equal ranges of its index on the ascending DM grid."""
        grid = self.sigmas.to(sigma.device, torch.float64)
        k = torch.searchsorted(grid, sigma.double()).clamp(max=len(grid) - 1)
        return (k * self.ratio_bins // len(self.sigmas)).long().cpu()

    def f_weights(self, logits: Tensor, sigma: Tensor) -> Tensor:
        """Per-sample ``h(r)`` ``[B]``, batch mean 1 (module docstring), from the discriminator logits ``[B]``."""
        r = density_ratio(logits.detach(), self.logit_clamp, self.ratio_range)
        if self.ratio_normalization:
            b = self.ratio_bin(sigma)
            self._pending[0].index_add_(0, b, r.double().cpu())
            self._pending[1].index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
            r = r / self.ratio_mean[b].to(r.device, r.dtype)
        h = f_weight(r, self.divergence)
        return h / h.mean()

    def dm_gradient(
        self, x: Tensor, x_t: Tensor, sigma: Tensor, cond: Conditioning, x0_real: Tensor, x0_fake: Tensor
    ) -> Tensor:
        g = super().dm_gradient(x, x_t, sigma, cond, x0_real, x0_fake)
        if self.divergence == "reverse_kl" and not self.ratio_normalization:
            return g  # h = 1: DMD2 exactly (no discriminator pass)
        # (f-distill §3, weighted DM gradient) h(r) weights each sample's DMD gradient, r from the logit at the same x_t
        logits = self.logits(x_t, sigma, cond).reshape(x.shape[0], -1).mean(1)  # [B, heads] -> the mean logit
        h = self.f_weights(logits, sigma)
        self.last_weights = h
        return append_dims(h.to(g.dtype), g.ndim) * g

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        self.last_weights = None
        out = super().generator_loss(batch, step)
        if self.last_weights is not None:  # the largest per-sample weight (1 everywhere = DMD2)
            out.logs["f_weight_max"] = float(self.last_weights.max())
        return out

    def on_step_end(self, step: int) -> None:
        """Fold this iteration's ``r`` into the running means (summed over processes first)."""
        super().on_step_end(step)
        if not self.ratio_normalization:
            return
        from diffdistill.utils.distributed import is_distributed

        pending, self._pending = self._pending, torch.zeros_like(self._pending)
        if is_distributed():
            import torch.distributed as dist

            nccl = dist.get_backend() == "nccl"
            t = pending.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            pending = t.cpu()
        seen = pending[1] > 0
        if not seen.any():
            return
        batch_mean = pending[0][seen] / pending[1][seen]
        first = self.ratio_seen[seen] == 0
        old = self.ratio_mean[seen]
        ema = self.ratio_decay * old + (1 - self.ratio_decay) * batch_mean
        self.ratio_mean[seen] = torch.where(first, batch_mean, ema)
        self.ratio_seen[seen] += pending[1][seen]

    def pass_count(self) -> PassCount:
        """DMD2's, plus the generator update's no-grad feature pass for the logits (none when ``h = 1``)."""
        base = super().pass_count()
        if self.divergence == "reverse_kl" and not self.ratio_normalization:
            return base
        f = feature_pass_cost(self.feature_network, self.discriminator)
        r = self.update_schedule.critic_steps_per_generator_step
        return PassCount(base.forward + f / r, base.forward_grad, base.backward, base.jvp)

    def state_dict(self) -> dict[str, Any]:
        return {"ratio_mean": self.ratio_mean.clone(), "ratio_seen": self.ratio_seen.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"ratio_mean", "ratio_seen"} or state["ratio_mean"].shape != self.ratio_mean.shape:
            raise ValueError(
                f"objective 'fdistill': the checkpoint's state {sorted(state)} does not match objective.ratio_bins="
                f"{self.ratio_bins}"
            )
        self.ratio_mean = state["ratio_mean"].double().cpu().clone()
        self.ratio_seen = state["ratio_seen"].double().cpu().clone()
