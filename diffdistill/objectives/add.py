"""ADD and LADD: a few-step student trained on noised data against a discriminator on frozen features.

ADD, Sauer et al., "Adversarial Diffusion Distillation" (2023, arXiv:2311.17042), §3:

    student input   x_s = x0 + sigma_s eps,  x0 real,  sigma_s ~ U(student.sampling_sigmas)     (§3.1, Fig. 2)
    x_hat           = G(x_s, sigma_s)
    generator       L = -D(x_hat) + distill_weight * c(t) ||x_hat - sg(D_teacher(x_hat + sigma_t eps', sigma_t))||^2
                        (Eq. 1: L_adv + lambda L_distill, lambda = 2.5; Eq. 2: hinge generator loss;
                         Eq. 4: distillation to the teacher's prediction at the re-noised x_hat, weight c(t))
    discriminator   max(0, 1 - D(x0)) + max(0, 1 + D(x_hat)) + r1_weight R1(x0)        (Eq. 3, R1 weight 1e-5)

D is light trainable heads on a frozen feature network evaluated on the clean images. The paper uses DINOv2
ViT-S; here the teacher's own features at its smallest noise level (``discriminator_sigma``) are the default, as
they need no other weights. A DINOv2 through ``timm`` is not implemented: asking for it (``network: dinov2``)
raises an error that says so (nothing is ever downloaded).

LADD, Sauer et al., "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation" (2024,
arXiv:2403.12015), §3: the same student on noised data, no distillation loss, and heads on the frozen
*teacher's* features of *re-noised* inputs, ``x_hat + sigma eps`` and ``x0 + sigma eps`` at the same per-sample
sigma, drawn from a logit-normal in rectified-flow time ``u = sigmoid(m + s n)`` (m = 1, s = 1, §3.2), which in
the EDM view (``x_u / (1 - u) = x0 + u / (1 - u) eps``, so ``sigma = u / (1 - u)``) is a log-normal sigma,
``ln sigma ~ N(m, s^2)``. Its data (the student's inputs and the discriminator's "real" side) are
teacher-generated samples by default (§3.1, "synthetic data"; generated once by the teacher's Heun sampler and
cached, :class:`~diffdistill.objectives.dmd.TeacherPairs`) or the dataset's images (``data: real``). The
critic/generator interleave is ``critic_steps_per_generator_step`` / ``generator_warmup_steps``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from diffdistill.conventions import append_dims
from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.models.discriminator import INPUT_TAP, Discriminator, feature_pass_cost
from diffdistill.objectives import gan
from diffdistill.objectives.base import LossOutput, Objective, Paper, PassCount, UpdateSchedule, register_objective
from diffdistill.objectives.common import add_noise, dm_timestep_grid, karras_index_sigmas, per_sample_mean
from diffdistill.objectives.dmd import TeacherPairs
from diffdistill.schedules.karras import KarrasSchedule

HEAD_KEYS = ("network", "taps", "head", "hidden", "weights")
FEATURE_NETWORKS = ("teacher", "none", "dinov2")
DISTILL_WEIGHTINGS = ("alpha", "none")
DATA_SOURCES = ("synthetic", "real")


def heads_spec(spec: dict[str, Any] | None, default_taps: list | str) -> dict[str, Any]:
    """``discriminator_heads`` of ADD / LADD merged over the defaults (teacher features, conv heads), each key checked.

    ``taps`` is a list of indices into the network's ``features`` (or ``input``), or ``all``: one head per tap.
    ``network: dinov2`` (ADD's DINOv2 through ``timm``, from local ``weights``) is not implemented: it raises.
    """
    if spec is not None and not hasattr(spec, "keys"):
        raise ValueError(f"objective.discriminator_heads must be a mapping or null, got {spec!r}")
    spec = dict(spec or {})
    unknown = set(spec) - set(HEAD_KEYS)
    if unknown:
        raise ValueError(f"objective.discriminator_heads: unknown keys {sorted(unknown)} (known: {sorted(HEAD_KEYS)})")
    out = {"network": "teacher", "taps": default_taps, "head": "conv", "hidden": None, "weights": None, **spec}
    if out["network"] not in FEATURE_NETWORKS:
        raise ValueError(
            f"objective.discriminator_heads.network must be one of {FEATURE_NETWORKS}, got {out['network']!r}"
        )
    if out["network"] == "dinov2":
        raise ValueError(
            "objective.discriminator_heads.network=dinov2 (ADD's DINOv2 ViT-S through timm, loaded from local "
            "discriminator_heads.weights, never downloaded) is not implemented in this version; use network: teacher "
            "(the teacher's own features, the default) or network: none with taps: [input]"
        )
    taps = out["taps"]
    if taps != "all":
        if isinstance(taps, (str, int)) or not taps:
            raise ValueError(f"objective.discriminator_heads.taps must be a non-empty list or 'all', got {taps!r}")
        out["taps"] = [t if t == INPUT_TAP else int(t) for t in taps]
    if out["network"] == "none" and out["taps"] != [INPUT_TAP]:
        raise ValueError("objective.discriminator_heads: network 'none' reads only the 'input' tap (taps: [input])")
    return out


def distill_weight_c(sigma: Tensor, kind: str) -> Tensor:
    """ADD's c(t) of the distillation loss: ``alpha_t`` of the variance-preserving process at the same noise level,
    ``1 / sqrt(1 + sigma^2)`` (``x_VP = alpha x0 + sqrt(1 - alpha^2) eps`` is ``x0 + sigma eps`` scaled), or 1."""
    if kind == "alpha":
        return (1.0 + sigma.double() ** 2).rsqrt().float()
    return torch.ones_like(sigma)


class AdversarialDistillation(Objective):
    """What ADD and LADD share: the student on noised data, a discriminator role on frozen features, hinge losses
    and R1 in the critic update. Subclasses say where data come from and at which sigma the heads look."""

    roles = ("generator", "discriminator")
    few_step_student = False
    default_taps: list | str = [-1]

    def __init__(
        self,
        teacher: nn.Module,
        generator: nn.Module,
        discriminator: nn.Module,
        gan_loss: str = "hinge",
        gan_generator_weight: float = 1.0,
        discriminator_heads: dict | None = None,
        r1_weight: float = 0.0,
        r1_kind: str = "exact",
        r1_noise_std: float = 0.1,
        critic_steps_per_generator_step: int = 1,
        generator_warmup_steps: int = 0,
    ):
        for key, w in (("gan_generator_weight", gan_generator_weight), ("r1_weight", r1_weight)):
            if not w >= 0:
                raise ValueError(f"objective.{key} must be >= 0, got {w}")
        if r1_kind not in gan.R1_KINDS:
            raise ValueError(f"objective.r1_kind must be one of {gan.R1_KINDS}, got {r1_kind!r}")
        if not r1_noise_std > 0:
            raise ValueError(f"objective.r1_noise_std must be > 0, got {r1_noise_std}")
        self.teacher, self.generator, self.discriminator = teacher, generator, discriminator
        self.gan_loss = gan.check_gan_loss(gan_loss, "objective.gan_loss")
        self.gan_generator_weight = float(gan_generator_weight)
        spec = heads_spec(discriminator_heads, self.default_taps)
        self.feature_network = teacher if spec["network"] == "teacher" else None
        self.r1_weight, self.r1_kind, self.r1_noise_std = float(r1_weight), r1_kind, float(r1_noise_std)
        self.update_schedule = UpdateSchedule(critic_steps_per_generator_step, generator_warmup_steps)
        self.student_sigmas = torch.tensor(generator.sampling_sigmas, dtype=torch.float32)
        # a student trained on the noise levels of its k-step list samples in those k steps
        self.few_step_student = len(generator.sampling_sigmas) > 1

    @classmethod
    def build_role(
        cls, name: str, teacher: nn.Module, roles: dict[str, nn.Module], hparams: dict[str, Any] | None = None
    ) -> nn.Module:
        """The ``discriminator``: heads sized for the taps of ``discriminator_heads.network``."""
        if name != "discriminator":
            return super().build_role(name, teacher, roles, hparams)
        spec = heads_spec((hparams or {}).get("discriminator_heads"), cls.default_taps)
        network = teacher if spec["network"] == "teacher" else None
        shape = tuple(roles["generator"].sample_shape)
        taps = spec["taps"]
        if taps == "all":
            if network is None or not hasattr(network, "features"):
                raise ValueError("objective.discriminator_heads.taps=all needs a network with `features`")
            taps = list(range(len(_probe_features(network, shape))))
        sigma_data = float(roles["generator"].sigma_data)
        return Discriminator.for_network(network, taps, spec["head"], spec["hidden"], shape, sigma_data)

    # ------------------------------------------------------------------------------------------
    def data(self, batch: Batch) -> tuple[Tensor, Conditioning]:
        """Clean samples ``x0`` (the student's inputs before noising, the discriminator's real side)."""
        if batch.x0 is None:
            raise ValueError(f"objective '{self.name}' needs real samples in every batch (data.*)")
        return batch.x0.float(), batch.cond

    def student_sample(self, x0: Tensor, cond: Conditioning, grad: bool = True) -> Tensor:
        """``x_hat = G(x0 + sigma_s eps, sigma_s)`` with ``sigma_s`` drawn per sample from the student's list."""
        idx = torch.randint(len(self.student_sigmas), (x0.shape[0],))
        sigma_s = self.student_sigmas[idx].to(x0.device)
        x_s, _ = add_noise(x0, sigma_s)  # (ADD §3.1) the forward process on data, at a student timestep
        with torch.set_grad_enabled(grad):
            return self.generator.denoise(x_s, sigma_s, cond)

    def discriminator_sigmas(self, n: int, device) -> Tensor:
        raise NotImplementedError

    def discriminator_inputs(self, x: Tensor, sigma: Tensor) -> Tensor:
        """What the feature network sees at ``sigma`` (ADD: the clean image; LADD: re-noised)."""
        raise NotImplementedError

    def logits(self, x_in: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        return self.discriminator(self.feature_network, x_in, sigma, cond)

    def adversarial_generator_loss(self, x_hat: Tensor, cond: Conditioning) -> Tensor:
        sigma = self.discriminator_sigmas(x_hat.shape[0], x_hat.device)
        # with graph: the gradient reaches x_hat through the frozen feature network's activations
        logits = self.logits(self.discriminator_inputs(x_hat, sigma), sigma, cond)
        # (ADD Eq. 2) hinge generator loss -D(x_hat) (or the non-saturating softplus(-D))
        return gan.generator_loss(logits, self.gan_loss)

    def critic_loss(self, batch: Batch, step: int) -> LossOutput:
        cached = batch.scratch.pop("adversarial_generated", None)
        if cached is not None:
            x_hat, x0, cond = cached  # this iteration's generator samples and their data
        else:
            x0, cond = self.data(batch)
            x_hat = self.student_sample(x0, cond, grad=False)
        x_hat, n = x_hat.detach(), x0.shape[0]
        sigma = self.discriminator_sigmas(n, x0.device)  # the same sigma for generated and data samples
        x_fake, x_real = self.discriminator_inputs(x_hat, sigma), self.discriminator_inputs(x0, sigma)
        # one feature pass over [generated; data]
        both = self.logits(torch.cat([x_fake, x_real]), torch.cat([sigma, sigma]), Conditioning.cat([cond, cond]))
        l_fake, l_real = both[:n], both[n:]
        # (ADD Eq. 3) hinge: max(0, 1 - D(x0)) + max(0, 1 + D(x_hat))
        loss = gan.discriminator_loss(l_real, l_fake, self.gan_loss)
        logs = {
            "gan_discriminator": float(loss.detach().mean()),
            "d_real": float(l_real.detach().mean()),
            "d_fake": float(l_fake.detach().mean()),
        }
        if self.r1_weight > 0:
            r1 = gan.r1_penalty(lambda xr: self.logits(xr, sigma, cond), x_real, self.r1_kind, self.r1_noise_std)
            # (ADD Eq. 3; Mescheder et al. 2018, Eq. 9) gamma R1 at the data samples
            loss = loss + self.r1_weight * r1
            logs["r1"] = float(r1.detach().mean())
        return LossOutput(loss, logs)

    def feature_cost(self) -> float:
        """One feature pass of the network the heads read, in whole forwards (a UNet stops after its mid block)."""
        return feature_pass_cost(self.feature_network, self.discriminator)

    def pass_count(self, teacher_forwards: float = 0.0) -> PassCount:
        """One iteration averaged over the schedule; ``teacher_forwards``: extra no-grad teacher forwards of the
        generator update (ADD's distillation target)."""
        r = self.update_schedule.critic_steps_per_generator_step
        f = self.feature_cost()
        gan_g = f if self.gan_generator_weight > 0 else 0.0
        # generator update: G fwd + bwd; the features of x_hat fwd + bwd to x_hat
        gen = PassCount(forward=teacher_forwards, forward_grad=1.0 + gan_g, backward=1.0 + gan_g)
        # critic update: a no-grad student call when not cached; features of [generated; data] fwd + bwd;
        # R1: exact = the data half's graph once more and a double backward; approx = two data-half feature passes
        # and their backward
        r1_fwd = (f if self.r1_kind == "exact" else 2.0 * f) if self.r1_weight > 0 else 0.0
        r1_bwd = 2.0 * f if self.r1_weight > 0 else 0.0
        crit = PassCount(forward=(r - 1) / r, forward_grad=2.0 * f + r1_fwd, backward=2.0 * f + r1_bwd)
        return PassCount(
            forward=gen.forward / r + crit.forward,
            forward_grad=gen.forward_grad / r + crit.forward_grad,
            backward=gen.backward / r + crit.backward,
        )


def _probe_features(network: nn.Module, shape: tuple[int, ...]) -> list[Tensor]:
    p = next(iter(network.parameters()), None)
    x = torch.zeros(2, *shape, device=p.device if p is not None else "cpu")
    with torch.no_grad():
        return network.features(x, torch.ones(2, device=x.device), None)


@register_objective
class ADD(AdversarialDistillation):
    """Adversarial Diffusion Distillation (see the module docstring).

    Args:
        teacher: the frozen teacher (its CFG applies to the distillation target).
        generator: the student; trained at the noise levels of ``student.sampling_sigmas`` (paper: 4 of them,
            DDPM timesteps 999, 749, 499, 249; a one-step list trains a one-step student).
        discriminator: the heads (built by :meth:`build_role` from ``discriminator_heads``).
        schedule: the Karras grid the distillation noise levels index into (1000 levels, ascending).
        distill_weight: lambda of the distillation loss (paper: 2.5).
        distill_weighting: c(t): ``"alpha"`` (paper, ``alpha_t = 1 / sqrt(1 + sigma^2)``) or ``"none"``.
        distill_min_step_percent, distill_max_step_percent: distillation noise index ``k ~ U{min T .. max T}``.
        teacher_guidance_scale: CFG of the distillation target (``None``: the teacher's own scale).
        discriminator_sigma: the noise level at which the feature network reads the clean images (``None``:
            the teacher's ``sigma_min``).
        gan_loss: ``"hinge"`` (paper) or ``"ns"``; gan_generator_weight: weight of the adversarial term (1).
        discriminator_heads: ``{network: teacher | none | dinov2, taps: [-1], head: conv | mlp, hidden: null}``.
        r1_weight, r1_kind, r1_noise_std: R1 at the real images (paper: weight 1e-5).
        critic_steps_per_generator_step, generator_warmup_steps: the update interleave (paper: 1:1).
    """

    name = "add"
    paper = Paper("Adversarial Diffusion Distillation", "2311.17042", "Sauer et al.", 2023)
    requires_real_data = True

    def __init__(
        self,
        teacher: nn.Module,
        generator: nn.Module,
        discriminator: nn.Module,
        schedule: KarrasSchedule | None = None,
        distill_weight: float = 2.5,
        distill_weighting: str = "alpha",
        distill_min_step_percent: float = 0.0,
        distill_max_step_percent: float = 0.999,
        teacher_guidance_scale: float | None = None,
        discriminator_sigma: float | None = None,
        gan_loss: str = "hinge",
        gan_generator_weight: float = 1.0,
        discriminator_heads: dict | None = None,
        r1_weight: float = 1e-5,
        r1_kind: str = "exact",
        r1_noise_std: float = 0.1,
        critic_steps_per_generator_step: int = 1,
        generator_warmup_steps: int = 0,
    ):
        super().__init__(
            teacher,
            generator,
            discriminator,
            gan_loss,
            gan_generator_weight,
            discriminator_heads,
            r1_weight,
            r1_kind,
            r1_noise_std,
            critic_steps_per_generator_step,
            generator_warmup_steps,
        )
        if not distill_weight >= 0:
            raise ValueError(f"objective.distill_weight must be >= 0, got {distill_weight}")
        if distill_weighting not in DISTILL_WEIGHTINGS:
            raise ValueError(
                f"objective.distill_weighting must be one of {DISTILL_WEIGHTINGS}, got {distill_weighting!r}"
            )
        self.distill_weight, self.distill_weighting = float(distill_weight), distill_weighting
        self.sigmas, self.k_min, self.k_max = dm_timestep_grid(
            schedule, teacher, distill_min_step_percent, distill_max_step_percent
        )
        self.teacher_guidance_scale = teacher_guidance_scale
        s = float(teacher.sigma_min if discriminator_sigma is None else discriminator_sigma)
        if not s > 0:
            raise ValueError(f"objective.discriminator_sigma must be > 0, got {discriminator_sigma}")
        self.discriminator_sigma = s

    def discriminator_sigmas(self, n: int, device) -> Tensor:
        return torch.full((n,), self.discriminator_sigma, device=device)

    def discriminator_inputs(self, x: Tensor, sigma: Tensor) -> Tensor:
        return x  # (ADD §3.2) the discriminator sees clean images

    def distillation_loss(self, x_hat: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
        """Per-sample ``c(t) ||x_hat - sg(x0_teacher(x_hat + sigma_t eps', sigma_t))||^2`` (mean over elements)."""
        sigma = karras_index_sigmas(self.sigmas, x_hat.shape[0], self.k_min, self.k_max, x_hat.device)
        with torch.no_grad():
            x_t, _ = add_noise(x_hat.detach(), sigma)
            target = self.teacher(x_t, sigma, cond, guidance_scale=self.teacher_guidance_scale)
        # (ADD Eq. 4) distillation to the teacher's denoised re-noised student sample, target detached
        return distill_weight_c(sigma, self.distill_weighting) * per_sample_mean((x_hat - target) ** 2), sigma

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x0, cond = self.data(batch)
        x_hat = self.student_sample(x0, cond, grad=True)
        batch.scratch["adversarial_generated"] = (x_hat.detach(), x0, cond)
        loss, logs = torch.zeros(x0.shape[0], device=x0.device), {}
        if self.gan_generator_weight > 0:
            adv = self.adversarial_generator_loss(x_hat, cond)
            loss = loss + self.gan_generator_weight * adv
            logs["gan_generator"] = float(adv.detach().mean())
        if self.distill_weight > 0:
            distill, sigma = self.distillation_loss(x_hat, cond)
            # (ADD Eq. 1) L = L_adv + lambda L_distill
            loss = loss + self.distill_weight * distill
            logs.update(distill=float(distill.detach().mean()), distill_sigma_mean=float(sigma.mean()))
        return LossOutput(loss, logs)

    def pass_count(self) -> PassCount:
        w = self.teacher_guidance_scale
        w = getattr(self.teacher, "guidance_scale", 1.0) if w is None else w
        cfg = 2.0 if w != 1.0 else 1.0
        return super().pass_count(teacher_forwards=cfg if self.distill_weight > 0 else 0.0)


@register_objective
class LADD(AdversarialDistillation):
    """Latent Adversarial Diffusion Distillation (see the module docstring).

    Args:
        teacher: the frozen teacher: its features feed the heads, its samples are the synthetic data.
        generator: the student; trained at the noise levels of ``student.sampling_sigmas``.
        discriminator: the heads (``discriminator_heads``; default: one conv head on every teacher tap).
        renoise_mean, renoise_std: logit-normal ``u = sigmoid(m + s n)`` of the re-noising (paper: m = 1, s = 1),
            i.e. ``ln sigma ~ N(m, s^2)``, clamped to the teacher's noise range.
        data: ``"synthetic"`` (paper: teacher samples, generated once) or ``"real"`` (the dataset's images).
        synthetic_samples, synthetic_steps, synthetic_seed, synthetic_cache: the synthetic set (Heun steps of the
            teacher from a private seed; ``synthetic_cache``: a ``.pt`` file to save to / load from).
        teacher_guidance_scale: CFG of the teacher's synthetic samples (``None``: its own scale).
        gan_loss: ``"hinge"`` (paper) or ``"ns"`` (FastGen's LADD); gan_generator_weight: 1.
        r1_weight, r1_kind, r1_noise_std: R1 at the data samples (off in the paper; FastGen: ``approx``).
        critic_steps_per_generator_step, generator_warmup_steps: the update interleave (paper 1:1; FastGen 4:1).
    """

    name = "ladd"
    paper = Paper(
        "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation",
        "2403.12015",
        "Sauer et al.",
        2024,
    )
    default_taps = "all"

    def __init__(
        self,
        teacher: nn.Module,
        generator: nn.Module,
        discriminator: nn.Module,
        renoise_mean: float = 1.0,
        renoise_std: float = 1.0,
        data: str = "synthetic",
        synthetic_samples: int = 1024,
        synthetic_steps: int = 18,
        synthetic_seed: int = 0,
        synthetic_cache: str | None = None,
        teacher_guidance_scale: float | None = None,
        gan_loss: str = "hinge",
        gan_generator_weight: float = 1.0,
        discriminator_heads: dict | None = None,
        r1_weight: float = 0.0,
        r1_kind: str = "approx",
        r1_noise_std: float = 0.1,
        critic_steps_per_generator_step: int = 1,
        generator_warmup_steps: int = 0,
    ):
        super().__init__(
            teacher,
            generator,
            discriminator,
            gan_loss,
            gan_generator_weight,
            discriminator_heads,
            r1_weight,
            r1_kind,
            r1_noise_std,
            critic_steps_per_generator_step,
            generator_warmup_steps,
        )
        if data not in DATA_SOURCES:
            raise ValueError(f"objective.data must be one of {DATA_SOURCES}, got {data!r}")
        if not renoise_std > 0:
            raise ValueError(f"objective.renoise_std must be > 0, got {renoise_std}")
        self.renoise_mean, self.renoise_std = float(renoise_mean), float(renoise_std)
        self.data_source, self.teacher_guidance_scale = data, teacher_guidance_scale
        self.synthetic = None
        if data == "synthetic":
            self.synthetic = TeacherPairs(synthetic_samples, synthetic_steps, synthetic_seed, synthetic_cache)
        self.requires_real_data = data == "real"

    def data(self, batch: Batch) -> tuple[Tensor, Conditioning]:
        if self.synthetic is None:
            return super().data(batch)
        device = batch.x0.device if batch.x0 is not None else next(self.generator.parameters()).device
        if self.synthetic.pairs is None:
            shape = tuple(self.generator.sample_shape)
            self.synthetic.generate(self.teacher, shape, device, self.teacher_guidance_scale)
        # (LADD §3.1) teacher-generated images stand in for real data
        _, x0, cond = self.synthetic.draw(batch.batch_size)
        return x0, cond

    def discriminator_sigmas(self, n: int, device) -> Tensor:
        # (LADD §3.2) logit-normal u = sigmoid(m + s n) in rectified-flow time; sigma = u / (1 - u) = exp(m + s n)
        log_sigma = self.renoise_mean + self.renoise_std * torch.randn(n)
        lo, hi = math.log(self.teacher.sigma_min), math.log(self.teacher.sigma_max)
        return log_sigma.clamp(lo, hi).exp().to(device)

    def discriminator_inputs(self, x: Tensor, sigma: Tensor) -> Tensor:
        # (LADD §3.2) re-noised: x + sigma eps, fresh noise (with graph for generated samples)
        return x + append_dims(sigma, x.ndim) * torch.randn_like(x)

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x0, cond = self.data(batch)
        x_hat = self.student_sample(x0, cond, grad=True)
        batch.scratch["adversarial_generated"] = (x_hat.detach(), x0, cond)
        adv = self.adversarial_generator_loss(x_hat, cond)
        # (LADD §3) the adversarial loss alone, no distillation term
        return LossOutput(self.gan_generator_weight * adv, {"gan_generator": float(adv.detach().mean())})

    def pass_count(self) -> PassCount:
        """Per iteration; the synthetic set is generated once and not counted."""
        return super().pass_count()
