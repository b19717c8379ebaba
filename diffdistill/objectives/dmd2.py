"""DMD2: distribution matching with a GAN term, two time-scale updates and backward simulation.

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis" (NeurIPS 2024,
arXiv:2405.14867; official code ``tianweiy/DMD2``, ``main/edm/edm_guidance.py``, ``main/edm/train_edm.py``,
``main/sd_unified_model.py``). On top of :class:`~diffdistill.objectives.dmd.DMD`:

    generator (every ``critic_steps_per_generator_step``-th iteration, §4.1 TTUR):
        x   = G(z), or backward simulation for a k-step student (§4.4): k' ~ U{0..k-1} student steps from pure
              noise without gradient, re-noised to the next sigma of the student's list, then one step with gradient
        L_G = 1/2 mean(x - sg(x - g))^2                          (DMD gradient g in float64, per-sample NaN masking)
            + gan_generator_weight * softplus(-D(x + sigma eps))  (§4.2, D on the fake score's bottleneck)
    critic (every iteration; fake score + discriminator heads):
        L_C = lambda(sigma) ||mu_fake(x + sigma eps) - x||^2       (fake-score loss on detached samples)
            + gan_discriminator_weight * [softplus(D(x + sigma eps)) + softplus(-D(x_real + sigma eps_r))]
        (with ``fuse_critic_passes``, the default, both terms read the same x + sigma eps, so one forward of the
        fake score gives mu_fake and D's taps; DMD2's code draws a second sigma' eps' for the first term)
            (+ r1_weight * R1 at the noised real samples, off in the paper)

The discriminator (``diffdistill/models/discriminator.py``) holds only heads; it reads the taps of the fake score
(the paper) or of the teacher (FastGen's variant) passed in at call time. Real and generated images are noised at
the same per-sample sigma (the diffusion-GAN noising, index ``k ~ U{0..T-1}`` of the 1000-level Karras grid) and
go through the feature network as one batch. The GAN gradient of the generator passes through the fake score's
activations (its parameters are frozen for that update by the trainer). Real data are needed only when the
discriminator is trained (``gan_discriminator_weight > 0`` or ``r1_weight > 0``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffdistill.models.backbones import denoise_with_features
from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.models.discriminator import Discriminator, feature_pass_cost
from diffdistill.objectives import gan
from diffdistill.objectives.base import LossOutput, Paper, PassCount, register_objective
from diffdistill.objectives.common import (
    add_noise,
    backward_simulation,
    denoising_score_matching_loss,
    karras_index_sigmas,
    weighted_denoising_error,
)
from diffdistill.objectives.dmd import DMD
from diffdistill.schedules.karras import KarrasSchedule

# DMD2's classifier: one conv head on the fake score's bottleneck (the last feature tap)
DEFAULT_HEADS: dict[str, Any] = {"network": "fake_score", "taps": [-1], "head": "conv", "hidden": None}
FEATURE_NETWORKS = ("fake_score", "teacher", "none")


def heads_spec(spec: dict[str, Any] | None) -> dict[str, Any]:
    """``discriminator_heads`` merged over the paper's default, each key checked."""
    if spec is not None and not hasattr(spec, "keys"):
        raise ValueError(f"objective.discriminator_heads must be a mapping or null, got {spec!r}")
    spec = dict(spec or {})
    unknown = set(spec) - set(DEFAULT_HEADS)
    if unknown:
        raise ValueError(
            f"objective.discriminator_heads: unknown keys {sorted(unknown)} (known: {sorted(DEFAULT_HEADS)})"
        )
    out = {**DEFAULT_HEADS, **spec}
    if out["network"] not in FEATURE_NETWORKS:
        raise ValueError(
            f"objective.discriminator_heads.network must be one of {FEATURE_NETWORKS}, got {out['network']!r}"
        )
    taps = out["taps"]
    if isinstance(taps, (str, int)) or not taps:
        raise ValueError(f"objective.discriminator_heads.taps must be a non-empty list, got {taps!r}")
    out["taps"] = list(taps)
    if out["network"] == "none" and any(t != "input" for t in out["taps"]):
        raise ValueError("objective.discriminator_heads: network 'none' reads only the 'input' tap (taps: [input])")
    return out


@register_objective
class DMD2(DMD):
    """DMD2 (see the module docstring).

    Args:
        teacher, generator, fake_score: as in :class:`DMD`.
        discriminator: the heads (built by :meth:`build_role` from ``discriminator_heads``).
        critic_steps_per_generator_step: TTUR ratio (paper: 5 ImageNet and SDXL, 10 SD1.5).
        gan_generator_weight: weight of the generator's GAN term (paper: 3e-3 ImageNet, 5e-3 SDXL, 1e-3 SD1.5).
        gan_discriminator_weight: weight of the discriminator loss added to the fake-score loss (paper: 1e-2).
        gan_loss: ``"ns"`` (paper) or ``"hinge"``.
        gan_max_step_percent: diffusion-GAN noise index ``k ~ U{0 .. gan_max_step_percent T - 1}`` (paper: 1).
        discriminator_heads: ``{network: fake_score | teacher | none, taps: [-1], head: conv | mlp, hidden: null}``
            (paper: one conv head on the fake score's bottleneck).
        r1_weight, r1_kind, r1_noise_std: R1 on noised real samples (``exact`` / ``approx``); 0 in the paper.
        backward_simulation: train a k-step student (``student.sampling_sigmas`` with k > 1 entries) on its own
            k'-step samples (§4.4); ``False`` trains every step from pure noise.
        fuse_critic_passes: in the critic update, noise the generated samples once for the fake-score loss and the
            discriminator, so one forward of the fake score gives its output and the taps (the real half is one
            encoder pass). Each loss keeps its law; only their noise draws are shared, where DMD2's code draws
            them apart (``False``: that form, one more encoder pass of the generated half).
        **regression: ``regression_weight``, ``regression_*`` and ``lpips_*`` of :class:`DMD`: DMD v1's regression
            onto teacher ODE pairs (arXiv:2311.18828, Eq. 9), which DMD2 drops (weight 0 by default, as the paper);
            an option because the DM gradient barely sees mode weights (docs/invariants.md §5b). On a k-step
            student it regresses the one-step map from ``z``.
        Others as in :class:`DMD` (``float64`` gradient always on).
    """

    name = "dmd2"
    paper = Paper(
        "Improved Distribution Matching Distillation for Fast Image Synthesis", "2405.14867", "Yin et al.", 2024
    )
    roles = ("generator", "fake_score", "discriminator")
    requires_real_data = True
    float64 = True

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
        fuse_critic_passes: bool = True,
        **regression: Any,
    ):
        super().__init__(
            teacher,
            generator,
            fake_score,
            schedule,
            min_step_percent,
            max_step_percent,
            real_guidance_scale,
            fake_weighting,
            critic_steps_per_generator_step,
            generator_warmup_steps,
            **regression,
        )
        for key, w in (
            ("gan_generator_weight", gan_generator_weight),
            ("gan_discriminator_weight", gan_discriminator_weight),
            ("r1_weight", r1_weight),
        ):
            if not w >= 0:
                raise ValueError(f"{key} must be >= 0, got {w}")
        if not 0.0 < gan_max_step_percent <= 1.0:
            raise ValueError(f"gan_max_step_percent must lie in (0, 1], got {gan_max_step_percent}")
        if r1_kind not in gan.R1_KINDS:
            raise ValueError(f"r1_kind must be one of {gan.R1_KINDS}, got {r1_kind!r}")
        if not r1_noise_std > 0:
            raise ValueError(f"r1_noise_std must be > 0, got {r1_noise_std}")
        self.gan_loss = gan.check_gan_loss(gan_loss)
        self.discriminator = discriminator
        spec = heads_spec(discriminator_heads)
        self.feature_network = {"fake_score": fake_score, "teacher": teacher, "none": None}[spec["network"]]
        self.gan_generator_weight, self.gan_discriminator_weight = (
            float(gan_generator_weight),
            float(gan_discriminator_weight),
        )
        self.gan_k_max = max(0, int(gan_max_step_percent * len(self.sigmas)) - 1)
        self.r1_weight, self.r1_kind, self.r1_noise_std = float(r1_weight), r1_kind, float(r1_noise_std)
        self.backward_simulation = bool(backward_simulation)
        self.fuse_critic_passes = bool(fuse_critic_passes)
        # real samples are read only by the discriminator's update
        self.requires_real_data = self.gan_discriminator_weight > 0 or self.r1_weight > 0
        # a k-step student trained by backward simulation samples in its k steps
        self.few_step_student = self.backward_simulation and len(generator.sampling_sigmas) > 1

    @classmethod
    def build_role(
        cls, name: str, teacher: nn.Module, roles: dict[str, nn.Module], hparams: dict[str, Any] | None = None
    ) -> nn.Module:
        """The ``discriminator``: heads sized for the taps of ``discriminator_heads.network``."""
        if name != "discriminator":
            return super().build_role(name, teacher, roles, hparams)
        spec = heads_spec((hparams or {}).get("discriminator_heads"))
        network = {"fake_score": roles.get("fake_score"), "teacher": teacher, "none": None}[spec["network"]]
        shape = tuple(roles["generator"].sample_shape)
        sigma_data = float(roles["generator"].sigma_data)
        return Discriminator.for_network(network, spec["taps"], spec["head"], spec["hidden"], shape, sigma_data)

    # ------------------------------------------------------------------------------------------
    def simulation_steps(self, step: int) -> int:
        """Student calls of this iteration's backward simulation: ``k' + 1`` with ``k' ~ U{0..k-1}``, one draw per
        iteration from a generator seeded by the step (shared by every micro-batch and process, as in DMD2)."""
        k = len(self.generator.sampling_sigmas)
        if k == 1 or not self.backward_simulation:
            return 1
        g = torch.Generator().manual_seed(1_000_003 * int(step) + 17)
        return int(torch.randint(k, (1,), generator=g)) + 1

    def generate_at(self, batch: Batch, step: int, grad: bool = True) -> tuple[Tensor, Conditioning]:
        """Generator samples of this iteration (backward simulation for k-step students; graph only in the last
        student call, and only with ``grad``)."""
        cond, n = batch.cond, batch.batch_size
        device = batch.x0.device if batch.x0 is not None else next(self.generator.parameters()).device
        sigmas = self.generator.sampling_sigmas
        z = torch.randn(n, *self.generator.sample_shape, device=device)
        sigma = torch.full((n,), float(sigmas[0]), device=device)
        with torch.set_grad_enabled(grad):
            return backward_simulation(
                self.generator.denoise,
                self.generator.noise_input(z, sigma),
                sigma,
                self.simulation_steps(step),
                cond,
                lambda i, s: torch.full_like(s, float(sigmas[i + 1])),
                grad,
            )[0], cond

    @property
    def fuses_critic_passes(self) -> bool:
        """Whether the critic update reads the fake-score loss and the generated half of the discriminator from
        one forward of the fake score (``fuse_critic_passes``, when the heads read the fake score and both noise
        levels follow the full grid, ``gan_max_step_percent = 1``)."""
        return (
            self.fuse_critic_passes
            and self.feature_network is self.fake_score
            and self.discriminator.needs_features
            and self.gan_k_max == len(self.sigmas) - 1
        )

    def gan_sigmas(self, n: int, device) -> Tensor:
        # (DMD2 §4.2) diffusion-GAN noise level: index k ~ U{0..T-1} of the ascending Karras grid
        return karras_index_sigmas(self.sigmas, n, 0, self.gan_k_max, device)

    def logits(self, x_t: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        return self.discriminator(self.feature_network, x_t, sigma, cond)

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x, cond = self.generate_at(batch, step, grad=True)
        loss, logs = self.distribution_matching_loss(x, cond)
        batch.scratch["dmd_generated"] = (x.detach(), cond)
        if self.gan_generator_weight > 0:
            sigma = self.gan_sigmas(x.shape[0], x.device)
            x_t, _ = add_noise(x, sigma)  # with graph: the GAN gradient reaches x through the frozen fake score
            # (DMD2 Eq. 5, generator side) non-saturating: softplus(-D(x_t))
            g_gan = gan.generator_loss(self.logits(x_t, sigma, cond), self.gan_loss)
            loss = loss + self.gan_generator_weight * g_gan
            logs["gan_generator"] = float(g_gan.detach().mean())
        return LossOutput(self.with_regression(loss, logs, x.shape[0], x.device), logs)  # off in DMD2's paper

    def critic_loss(self, batch: Batch, step: int) -> LossOutput:
        cached = batch.scratch.pop("dmd_generated", None)
        if cached is not None:
            x, cond = cached  # the samples of this iteration's generator update
        else:
            x, cond = self.generate_at(batch, step, grad=False)
        x = x.detach()
        n = x.shape[0]
        gan_on = self.gan_discriminator_weight > 0 or self.r1_weight > 0
        sigma_g = karras_index_sigmas(self.sigmas, n, 0, len(self.sigmas) - 1, x.device)
        if gan_on and self.fuses_critic_passes:
            # one noised x_t for the fake-score loss and the discriminator's generated half (their noise levels
            # have one law, the full grid): one forward of the fake score gives its output and the taps
            x_fake_t, _ = add_noise(x, sigma_g)
            x0_fake, taps = denoise_with_features(self.fake_score, x_fake_t, sigma_g, cond)
            # (DMD Eq. 6) fake-score denoising loss over the full sigma range
            loss = weighted_denoising_error(x0_fake, x, sigma_g, self.fake_score.sigma_data, self.fake_weighting)
            x_real_t, _ = add_noise(batch.x0.to(x.dtype), sigma_g)  # the same sigma for real and generated
            l_fake, l_real = (
                self.discriminator.logits(taps, x_fake_t, sigma_g),
                self.logits(x_real_t, sigma_g, batch.cond),
            )
        else:
            # (DMD Eq. 6) fake-score denoising loss over the full sigma range
            loss = denoising_score_matching_loss(self.fake_score, x, sigma_g, cond, self.fake_weighting)
            if gan_on:  # independent noise for the GAN (DMD2's code): one feature pass over [generated; real]
                sigma_g = self.gan_sigmas(n, x.device)
                x_fake_t, _ = add_noise(x, sigma_g)
                x_real_t, _ = add_noise(batch.x0.to(x.dtype), sigma_g)  # the same sigma for real and generated
                both = self.logits(
                    torch.cat([x_fake_t, x_real_t]), torch.cat([sigma_g, sigma_g]), Conditioning.cat([cond, batch.cond])
                )
                l_fake, l_real = both[:n], both[n:]
        logs = {"fake_dsm": float(loss.detach().mean())}
        if gan_on:
            # (DMD2 Eq. 5, discriminator side) softplus(D(fake)) + softplus(-D(real))
            d_loss = gan.discriminator_loss(l_real, l_fake, self.gan_loss)
            loss = loss + self.gan_discriminator_weight * d_loss
            logs.update(
                gan_discriminator=float(d_loss.detach().mean()),
                d_real=float(l_real.detach().mean()),
                d_fake=float(l_fake.detach().mean()),
            )
            if self.r1_weight > 0:
                r1 = gan.r1_penalty(
                    lambda xr: self.logits(xr, sigma_g, batch.cond), x_real_t, self.r1_kind, self.r1_noise_std
                )
                # (Mescheder et al. 2018, Eq. 9) R1 at the noised real samples
                loss = loss + self.r1_weight * r1
                logs["r1"] = float(r1.detach().mean())
        return LossOutput(loss, logs)

    def pass_count(self) -> PassCount:
        """One iteration averaged over a TTUR cycle (``r`` critic updates, one generator update)."""
        r = self.update_schedule.critic_steps_per_generator_step
        w = self.real_guidance_scale
        w = getattr(self.teacher, "guidance_scale", 1.0) if w is None else w
        cfg = 2.0 if w != 1.0 else 1.0
        k = len(self.generator.sampling_sigmas) if self.backward_simulation else 1
        sim = (k - 1) / 2  # mean no-grad student calls before the one with a graph
        # one feature pass of the network the heads read, in whole forwards (a UNet stops after its mid block)
        f = feature_pass_cost(self.feature_network, self.discriminator)
        gan_g = f if self.gan_generator_weight > 0 else 0.0
        # [generated; real] features, or (fused) the real half alone: the generated half's taps come with the DSM pass
        halves = 1.0 if self.fuses_critic_passes else 2.0
        gan_d = halves * f if (self.gan_discriminator_weight > 0 or self.r1_weight > 0) else 0.0
        # R1: exact = the real half's graph once more and a double backward; approx = two real-half feature passes
        r1_fwd = (f if self.r1_kind == "exact" else 2.0 * f) if self.r1_weight > 0 else 0.0
        r1_bwd = 2.0 * f if self.r1_weight > 0 else 0.0
        reg = self.regression_passes
        # generator update: sim + G fwd/bwd; teacher (x2 with CFG) + fake forwards; GAN: features fwd + bwd to x
        gen = PassCount(forward=sim + cfg + 1.0, forward_grad=1.0 + gan_g + reg, backward=1.0 + gan_g + reg)
        # critic update: a no-grad generation when not cached; fake fwd+bwd (DSM); features of [generated; real]
        crit_fwd = (sim + 1.0) * (r - 1) / r
        crit = PassCount(forward=crit_fwd, forward_grad=1.0 + gan_d + r1_fwd, backward=1.0 + gan_d + r1_bwd)
        return PassCount(
            forward=gen.forward / r + crit.forward,
            forward_grad=gen.forward_grad / r + crit.forward_grad,
            backward=gen.backward / r + crit.backward,
        )
