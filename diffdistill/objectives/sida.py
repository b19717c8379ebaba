"""SiDA: Score identity Distillation with an adversarial loss on the fake score's encoder.

Zhou et al., "Adversarial Score Identity Distillation: Rapidly Surpassing the Teacher in One Step" (ICLR 2025,
arXiv:2410.14919). Official code: ``mingyuanzhou/SiD``, branch ``sida`` (``sida_training/sida_loss.py``,
``sida_training/sida_training_loop.py``). On top of :class:`~diffdistill.objectives.sid.SiD`:

    critic (fake score + discriminator heads; ln sigma ~ N(P_mean, P_std^2), one noise n for both halves):
        L_psi = lambda(sigma) ||f_psi(x_g + sigma n) - x_g||^2                        (SiD's fake-score loss)
              + gan_discriminator_weight * lambda(sigma) 1/2 [BCE(D(x_real + sigma n), 1) + BCE(D(x_g + sigma n), 0)]
    generator (at SiD's x_t = x_g + sigma n, sigma on the truncated Karras ramp):
        L_theta = L_SiD                                                     before the switch-on point
                = sid_weight L_SiD + gan_generator_weight CHW BCE(clamp(D(x_t), +-10), 1) / omega   after it

``D`` is the discriminator role (``diffdistill/models/discriminator.py``): heads on the taps of the fake score
(``discriminator_heads``, default one conv head on its bottleneck, the encoder's last output), so the fake score's
encoder is trained by the adversarial loss in the critic update, and in the generator update the GAN gradient
reaches ``x_g`` through the fake score's (frozen) activations.

Defaults are the official loop's: ``sid_weight`` 0.5 and ``gan_generator_weight`` 0.5 x 0.01 (``(0.5 loss +
0.5 loss_gan)`` with ``loss_scaling_G_gan = 0.01``), ``gan_discriminator_weight`` 1 (``loss_scaling_D``), the GAN
term of the generator on after 200k images and no generator update in the first 100k (the fake score and the
discriminator warm up alone; both are 0 by default, set by the paper recipes). Switch-on points are given in
images seen and converted to iterations with ``images_per_step`` (the global batch): the GAN term is on in
iteration ``s`` when ``s images_per_step >= gan_start_images``; the generator's first update comes after
``max(1, ceil(generator_warmup_images / images_per_step))`` critic-only iterations.

Differences from the official code (each a choice, for the per-sample loss contract of ``Objective``):

* The official logit map is the channel mean of the encoder output (no parameters), its BCE averaged over the
  GPU's batch before the per-sample ``lambda`` or ``1 / omega``; here the logits come from the discriminator
  role's trainable heads on the same tap, and each sample's own BCE is weighted.
* The official critic gets one fake-score forward that returns both the denoised output and the logits; here the
  discriminator reads ``network.features`` in a second (shorter) pass.
* The official critic clips its gradients by value (1) when the GAN is on; the trainer clips by norm
  (``trainer.grad_clip``) for every role alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from diffdistill.conventions import append_dims
from diffdistill.models.backbones import denoise_with_features
from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.models.discriminator import Discriminator, feature_pass_cost
from diffdistill.objectives import gan
from diffdistill.objectives.base import LossOutput, Paper, PassCount, UpdateSchedule, register_objective
from diffdistill.objectives.common import dsm_weight
from diffdistill.objectives.dmd2 import heads_spec
from diffdistill.objectives.score_identity import fake_score_loss, finite_samples, generate, guidance_passes
from diffdistill.objectives.sid import SiD


def images_to_steps(images: int, images_per_step: int | None, key: str) -> int:
    """Iterations that see ``images`` samples (rounded up), ``images_per_step`` checked when needed."""
    if not images >= 0:
        raise ValueError(f"objective.{key} must be >= 0, got {images}")
    if images == 0:
        return 0
    if images_per_step is None or images_per_step < 1:
        raise ValueError(
            f"objective.{key}={images} is in images seen: set objective.images_per_step to the global batch "
            f"(trainer.batch_size x gradient_accumulation_steps x processes) to convert it to iterations, got "
            f"{images_per_step!r}"
        )
    return math.ceil(images / images_per_step)


@register_objective
class SiDA(SiD):
    """SiDA (see the module docstring).

    Args:
        teacher, generator, fake_score: as in :class:`SiD`.
        discriminator: the heads (built by :meth:`build_role` from ``discriminator_heads``).
        sid_weight: weight of the SiD loss while the GAN term is on (official 0.5; before it, 1).
        gan_generator_weight: weight of the generator's ``CHW BCE / omega`` term (official 0.5 x 0.01 = 5e-3;
            0 = no GAN term for the generator, SiD's generator loss).
        gan_discriminator_weight: weight of ``lambda(sigma) 1/2 (BCE_real + BCE_fake)`` in the critic loss
            (official 1; 0 with ``gan_generator_weight`` 0 = SiD, no real data read).
        gan_logit_clamp: the generator's logits are clamped to ``+-`` this (official 10; ``0`` = no clamp).
        gan_loss: ``"ns"`` (BCE with logits, the paper) or ``"hinge"``.
        gan_start_images: images seen before the generator's GAN term is on (official 200k; default 0, since the
            point belongs to a run's length: the cifar10 / imagenet64 options set the paper's).
        generator_warmup_images: images seen before the first generator update (official 100k; default 0).
        images_per_step: the global batch, converting the two image counts to iterations (needed when either is
            > 0; ``configs/objective/sida.yaml`` sets it from ``trainer.batch_size``).
        discriminator_heads: ``{network: fake_score | teacher | none, taps: [-1], head: conv | mlp, hidden: null}``
            (default: one conv head on the fake score's bottleneck, the encoder the paper reads).
        alpha: SiD's weight; 1.0 in every official SiDA run script (SiD's own default is 1.2).
        Others as in :class:`SiD`.
    """

    name = "sida"
    paper = Paper(
        "Adversarial Score Identity Distillation: Rapidly Surpassing the Teacher in One Step",
        "2410.14919",
        "Zhou et al.",
        2025,
    )
    roles = ("generator", "fake_score", "discriminator")
    requires_real_data = True

    def __init__(
        self,
        teacher: nn.Module,
        generator: nn.Module,
        fake_score: nn.Module,
        discriminator: nn.Module,
        sid_weight: float = 0.5,
        gan_generator_weight: float = 5e-3,
        gan_discriminator_weight: float = 1.0,
        gan_logit_clamp: float = 10.0,
        gan_loss: str = "ns",
        gan_start_images: int = 0,
        generator_warmup_images: int = 0,
        images_per_step: int | None = None,
        discriminator_heads: dict | None = None,
        alpha: float = 1.0,
        t_max: float = 800.0,
        rho: float = 7.0,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        real_guidance_scale: float | None = None,
        fake_guidance_scale: float = 1.0,
        fake_train_guidance_scale: float = 1.0,
        generator_loss_scale: float = 100.0,
        normalize: bool = True,
        num_steps: int = 1,
        score_gradients: bool = True,
        checkpoint_scores: bool = False,
        sigma_sampling: str = "karras",
        t_min: int = 20,
        fake_weighting: str = "edm",
        match_sigma_data: bool = True,
    ):
        super().__init__(
            teacher,
            generator,
            fake_score,
            alpha,
            t_max,
            rho,
            P_mean,
            P_std,
            real_guidance_scale,
            fake_guidance_scale,
            fake_train_guidance_scale,
            generator_loss_scale,
            normalize,
            num_steps,
            score_gradients,
            checkpoint_scores,
            sigma_sampling=sigma_sampling,
            t_min=t_min,
            fake_weighting=fake_weighting,
            match_sigma_data=match_sigma_data,
        )
        for key, w in (
            ("sid_weight", sid_weight),
            ("gan_generator_weight", gan_generator_weight),
            ("gan_discriminator_weight", gan_discriminator_weight),
            ("gan_logit_clamp", gan_logit_clamp),
        ):
            if not w >= 0:
                raise ValueError(f"objective.{key} must be >= 0, got {w}")
        self.gan_loss = gan.check_gan_loss(gan_loss, "objective.gan_loss")
        self.discriminator = discriminator
        spec = heads_spec(discriminator_heads)
        self.feature_network = {"fake_score": fake_score, "teacher": teacher, "none": None}[spec["network"]]
        self.sid_weight, self.gan_generator_weight = float(sid_weight), float(gan_generator_weight)
        self.gan_discriminator_weight, self.gan_logit_clamp = float(gan_discriminator_weight), float(gan_logit_clamp)
        self.gan_start_step = images_to_steps(gan_start_images, images_per_step, "gan_start_images")
        warmup = images_to_steps(generator_warmup_images, images_per_step, "generator_warmup_images")
        # SiD's order (the fake score first), the generator idle for the warm-up
        self.update_schedule = UpdateSchedule(1, generator_warmup_steps=max(1, warmup))
        self.requires_real_data = self.gan_discriminator_weight > 0

    @classmethod
    def build_role(
        cls, name: str, teacher: nn.Module, roles: dict[str, nn.Module], hparams: dict[str, Any] | None = None
    ) -> nn.Module:
        """The ``discriminator``: heads sized for the taps of ``discriminator_heads.network``."""
        if name != "discriminator":
            return super().build_role(name, teacher, roles, hparams)
        spec = heads_spec((hparams or {}).get("discriminator_heads"))
        network = {"fake_score": roles.get("fake_score"), "teacher": teacher, "none": None}[spec["network"]]
        gen = roles["generator"]
        return Discriminator.for_network(
            network, spec["taps"], spec["head"], spec["hidden"], tuple(gen.sample_shape), float(gen.sigma_data)
        )

    # ------------------------------------------------------------------------------------------
    def gan_active(self, step: int) -> bool:
        """Whether the generator's GAN term is on in iteration ``step``."""
        return self.gan_generator_weight > 0 and step >= self.gan_start_step

    def logits(self, x_t: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        return self.discriminator(self.feature_network, x_t, sigma, cond)

    @property
    def fuses_critic_passes(self) -> bool:
        """Whether the critic update reads the generated half's taps from the fake-score loss's own forward (the
        same x_t: always, when the heads read the fake score's features and its loss is unguided)."""
        return (
            self.feature_network is self.fake_score
            and self.discriminator.needs_features
            and guidance_passes(self.fake_score, self.fake_train_guidance_scale) == 1
        )

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        out, p = self.generator_terms(batch, step)
        if not self.gan_active(step):
            return out
        # with graph: the GAN gradient reaches x_g through the frozen feature network and heads
        x_t = p.x_g + append_dims(p.sigma, p.x_g.ndim) * p.noise
        logits = self.logits(x_t, p.sigma, batch.cond)
        if self.gan_logit_clamp > 0:
            logits = logits.clamp(-self.gan_logit_clamp, self.gan_logit_clamp)
        # (SiDA generator adversarial term; mingyuanzhou/SiD sida_loss.py generator_share_encoder_loss) BCE(D, 1),
        # scaled by the number of elements and divided by SiD's omega
        g_gan = gan.generator_loss(logits, self.gan_loss)
        g_gan = torch.where(p.keep, g_gan * p.x_g[0].numel() / p.omega, torch.zeros_like(g_gan))
        loss = self.sid_weight * out.loss + self.gan_generator_weight * g_gan
        return LossOutput(loss, {**out.logs, "gan_generator": float(g_gan.detach().mean())})

    def critic_loss(self, batch: Batch, step: int) -> LossOutput:
        if self.gan_discriminator_weight == 0:
            return super().critic_loss(batch, step)
        with torch.no_grad():  # fresh noise, as in SiD
            x_g, _ = generate(self.generator, batch, self.num_steps, grad=False)
        n = x_g.shape[0]
        sigma = self.fake_sigmas(n, x_g.device)
        noise = torch.randn_like(x_g)
        # real and generated samples at the same sigma and noise (sida_loss.py)
        s = append_dims(sigma, x_g.ndim)
        x_fake_t, x_real_t = x_g.detach() + s * noise, batch.x0.to(x_g.dtype) + s * noise
        x0_fake = None
        if self.fuses_critic_passes:  # the fake-score loss's forward at x_fake_t also gives the generated half's taps
            x0_fake, taps = denoise_with_features(self.fake_score, x_fake_t, sigma, batch.cond.without_negative())
        loss, logs = fake_score_loss(
            self.fake_score,
            x_g,
            batch.cond,
            guidance_scale=self.fake_train_guidance_scale,
            sigma=sigma,
            noise=noise,
            weighting=self.fake_weighting,
            x0_fake=x0_fake,
        )
        if self.fuses_critic_passes:
            l_fake, l_real = self.discriminator.logits(taps, x_fake_t, sigma), self.logits(x_real_t, sigma, batch.cond)
        else:  # through the feature network as one batch
            both = self.logits(
                torch.cat([x_fake_t, x_real_t]), torch.cat([sigma, sigma]), Conditioning.cat([batch.cond, batch.cond])
            )
            l_fake, l_real = both[:n], both[n:]
        keep = finite_samples(x_g, l_fake, l_real)
        # (SiDA discriminator loss; sida_loss.py fakescore_discriminator_share_encoder_loss)
        # lambda(sigma) 1/2 [BCE(D(real), 1) + BCE(D(fake), 0)]
        d_loss = (
            0.5
            * dsm_weight(sigma, float(self.fake_score.sigma_data), self.fake_weighting)
            * gan.discriminator_loss(l_real, l_fake, self.gan_loss)
        )
        d_loss = torch.where(keep, d_loss, torch.zeros_like(d_loss))
        logs.update(
            gan_discriminator=float(d_loss.detach().mean()),
            d_real=float(l_real.detach().mean()),
            d_fake=float(l_fake.detach().mean()),
        )
        return LossOutput(loss + self.gan_discriminator_weight * d_loss, logs)

    # ------------------------------------------------------------------------------------------
    def pass_count(self) -> PassCount:
        """SiD's passes plus, with the GAN on (its steady state), one feature pass with a backward to the input in
        the generator update and one of ``[generated; real]`` (2B) with a backward in the critic update."""
        base = super().pass_count()
        f = feature_pass_cost(self.feature_network, self.discriminator)
        halves = 1.0 if self.fuses_critic_passes else 2.0  # fused: the generated half's taps come with the DSM pass
        extra = (f if self.gan_generator_weight > 0 else 0.0) + (
            halves * f if self.gan_discriminator_weight > 0 else 0.0
        )
        return PassCount(base.forward, base.forward_grad + extra, base.backward + extra)
