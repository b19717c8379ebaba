"""Variational score distillation (SwiftBrush) and Diff-Instruct: DMD's generator update with other weightings.

* VSD / SwiftBrush: Nguyen & Tran, "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score
  Distillation" (CVPR 2024, arXiv:2312.05239), after ProlificDreamer's VSD (Wang et al. 2023, arXiv:2305.16213).
  Generator gradient ``omega(t) (eps_teacher^cfg(x_t) - eps_fake(x_t))`` (SwiftBrush §3, the VSD gradient) with
  ``eps = (x_t - x0_hat) / sigma``, i.e. ``omega(t) (x0_fake - x0_real) / sigma`` in the EDM view; the fake score is
  a LoRA on the teacher's network (its frozen base shared with the teacher, whose view runs with the adapters off),
  trained by denoising on the detached student samples, one update each per iteration.
* Diff-Instruct: Luo et al., "Diff-Instruct: A Universal Approach for Transferring Knowledge From Pre-trained
  Diffusion Models" (NeurIPS 2023, arXiv:2305.18455; official code ``pkulwj1994/diff_instruct``,
  ``training/di_loss.py``). The integral KL with ``w(sigma) = sigma^2``: the generator loss
  ``sum_pixels sg(D_fake(x_sigma) - D_real(x_sigma)) * x`` (no normaliser), so ``d/dx = sigma^2 (s_fake - s_real)``;
  ``ln sigma ~ N(-1.2, 1.2^2)`` for both losses; the student starts at ``student.sigma_init=1.0``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from diffdistill.conventions import append_dims
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.generator import FakeScore
from diffdistill.objectives.base import Paper, register_objective
from diffdistill.objectives.common import data_noise_scale, lognormal_sigmas
from diffdistill.objectives.dmd import DMD, dmd_gradient
from diffdistill.objectives.sid import check_sigma_init
from diffdistill.schedules.karras import KarrasSchedule

VSD_WEIGHTINGS = ("vp", "unit", "dmd")
DI_SIGMA_INIT = 1.0  # Diff-Instruct's generator input noise (README CIFAR-10 command of the official code)
DEFAULT_FAKE_LORA: dict[str, Any] = {
    "rank": 8,
    "alpha": None,
    "target_modules": None,
    "dropout": 0.0,
    "share_base": True,
}


def fake_lora_spec(spec: dict[str, Any] | None) -> dict[str, Any]:
    """``fake_lora`` merged over :data:`DEFAULT_FAKE_LORA`, each key checked."""
    if spec is not None and not hasattr(spec, "keys"):
        raise ValueError(f"objective.fake_lora must be a mapping or null, got {spec!r}")
    spec = dict(spec or {})
    unknown = set(spec) - set(DEFAULT_FAKE_LORA)
    if unknown:
        raise ValueError(f"objective.fake_lora: unknown keys {sorted(unknown)} (known: {sorted(DEFAULT_FAKE_LORA)})")
    out = {**DEFAULT_FAKE_LORA, **spec}
    rank = out["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"objective.fake_lora.rank must be an integer >= 1, got {rank!r}")
    return out


def lora_fake_score(teacher: nn.Module, given: FakeScore | None, spec: dict[str, Any]) -> FakeScore:
    """The fake score as LoRA adapters (adapter ``fake_score``) on a frozen base network.

    The base is ``given``'s network when the config names one (``fake_score.denoiser``, e.g. a network fitted to an
    analytic teacher); else, with ``share_base``, the teacher's own network, whose teacher view becomes a
    :class:`~diffdistill.models.lora.SharedBaseDenoiser` (adapters off): one copy of the base serves both roles;
    without ``share_base``, a frozen copy of the teacher's network.
    """
    from diffdistill.models.generator import trainable_copy
    from diffdistill.models.lora import SharedBaseDenoiser, add_lora

    if given is not None:
        net = given.denoiser
    elif spec["share_base"]:
        if isinstance(teacher.denoiser, SharedBaseDenoiser):
            raise ValueError(
                "objective.fake_lora.share_base: the teacher already shares its network with a LoRA student; set "
                "objective.fake_lora.share_base=false (or student.lora.share_base=false)"
            )
        if not any(True for _ in teacher.denoiser.parameters()):
            raise ValueError(
                "objective.fake_lora: the teacher has no network weights to put the LoRA fake score on (backbone="
                "analytic?); give it a base network with fake_score.denoiser=<_target_ config>, e.g. "
                "fake_score/denoiser=toy_mlp_fitted"
            )
        net = teacher.denoiser
    else:
        net = trainable_copy(teacher)
        net.__dict__.pop("peft_config", None)  # a copy of a LoRA student's base keeps peft's record of its adapters
    target = list(spec["target_modules"]) if spec["target_modules"] else None
    add_lora(net, int(spec["rank"]), spec["alpha"], target, float(spec["dropout"]), adapter_name="fake_score")
    if given is None and spec["share_base"]:
        teacher.denoiser = SharedBaseDenoiser(net)
    return FakeScore(net.train())


@register_objective
class VSD(DMD):
    """VSD / SwiftBrush (see the module docstring).

    Args:
        teacher, generator: as in :class:`DMD`.
        fake_score: the LoRA fake score (built by :meth:`build_role` from ``fake_lora``).
        min_step_percent, max_step_percent: ``t ~ U[0.02 T, 0.98 T]`` (SwiftBrush), as DMD's index range.
        real_guidance_scale: CFG of the teacher's branch (SwiftBrush: 4.5 on SD2.1; ``None`` = the teacher's own).
        fake_weighting: the LoRA's denoising loss weight (``edm`` or ``none``), as in :class:`DMD`.
        critic_steps_per_generator_step: 1 (alternating updates).
        weighting: ``omega(t)``: ``vp`` = ``1 - alpha_bar_t = sigma^2 / (1 + sigma^2)`` (the SDS/VSD weighting),
            ``unit`` = 1, or ``dmd`` = DMD's per-sample normaliser on ``x0_fake - x0_real`` instead.
        fake_lora: ``{rank: 8, alpha: null, target_modules: null, dropout: 0.0, share_base: true}``.
    """

    name = "vsd"
    paper = Paper(
        "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score Distillation",
        "2312.05239",
        "Nguyen and Tran",
        2024,
    )
    built_roles = ("fake_score",)

    def __init__(
        self,
        teacher: nn.Module,
        generator: nn.Module,
        fake_score: nn.Module,
        schedule: KarrasSchedule | None = None,
        min_step_percent: float = 0.02,
        max_step_percent: float = 0.98,
        real_guidance_scale: float | None = None,
        fake_weighting: str = "edm",
        critic_steps_per_generator_step: int = 1,
        generator_warmup_steps: int = 0,
        weighting: str = "vp",
        fake_lora: dict | None = None,
    ):
        if weighting not in VSD_WEIGHTINGS:
            raise ValueError(f"objective.weighting must be one of {VSD_WEIGHTINGS}, got {weighting!r}")
        fake_lora_spec(fake_lora)
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
            normalize=weighting == "dmd",
        )
        self.weighting = weighting

    @classmethod
    def build_role(
        cls, name: str, teacher: nn.Module, roles: dict[str, nn.Module], hparams: dict[str, Any] | None = None
    ) -> nn.Module:
        """The ``fake_score``: LoRA adapters on the teacher's network (see :func:`lora_fake_score`)."""
        if name != "fake_score":
            return super().build_role(name, teacher, roles, hparams)
        return lora_fake_score(teacher, roles.get("fake_score"), fake_lora_spec((hparams or {}).get("fake_lora")))

    def dm_gradient(
        self, x: Tensor, x_t: Tensor, sigma: Tensor, cond: Conditioning, x0_real: Tensor, x0_fake: Tensor
    ) -> Tensor:
        if self.weighting == "dmd":
            return super().dm_gradient(x, x_t, sigma, cond, x0_real, x0_fake)
        s = append_dims(sigma, x.ndim)
        # (SwiftBrush §3, VSD gradient) omega(t) (eps_teacher - eps_fake), eps = (x_t - x0_hat) / sigma in the EDM view
        eps_diff = (x0_fake - x0_real) / s
        omega = s**2 / (1.0 + s**2) if self.weighting == "vp" else torch.ones_like(s)
        return torch.nan_to_num(omega * eps_diff, nan=0.0, posinf=0.0, neginf=0.0)


@register_objective
class DiffInstruct(DMD):
    """Diff-Instruct (see the module docstring).

    Args:
        teacher, generator, fake_score: as in :class:`DMD` (the fake score a full copy of the teacher).
        P_mean, P_std: ``ln sigma ~ N(P_mean, P_std^2)`` for both losses (official code: -1.2, 1.2, for
            ``sigma_data = 0.5``; ``P_mean + ln(sigma_data / 0.5)`` with ``match_sigma_data``, exact at 0.5).
        match_sigma_data: carry ``P_mean`` and the expected ``student.sigma_init`` (1) to the teacher's data.
        real_guidance_scale, fake_weighting, critic_steps_per_generator_step, generator_warmup_steps: as in
            :class:`DMD` (1:1 alternation).
    """

    name = "diff_instruct"
    paper = Paper(
        "Diff-Instruct: A Universal Approach for Transferring Knowledge From Pre-trained Diffusion Models",
        "2305.18455",
        "Luo et al.",
        2023,
    )

    def __init__(
        self,
        teacher: nn.Module,
        generator: nn.Module,
        fake_score: nn.Module,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        real_guidance_scale: float | None = None,
        fake_weighting: str = "edm",
        critic_steps_per_generator_step: int = 1,
        generator_warmup_steps: int = 0,
        match_sigma_data: bool = True,
    ):
        if not P_std > 0:
            raise ValueError(f"objective.P_std must be > 0, got {P_std}")
        c = data_noise_scale(teacher, generator, match_sigma_data)  # the paper's noise levels at the data's scale
        check_sigma_init(generator, self.name, c, DI_SIGMA_INIT, "Diff-Instruct's", "Luo et al. 2023")
        super().__init__(
            teacher,
            generator,
            fake_score,
            None,
            real_guidance_scale=real_guidance_scale,
            fake_weighting=fake_weighting,
            critic_steps_per_generator_step=critic_steps_per_generator_step,
            generator_warmup_steps=generator_warmup_steps,
            normalize=False,
        )
        self.P_mean, self.P_std = float(P_mean) + math.log(c), float(P_std)

    def dm_sigmas(self, n: int, device) -> Tensor:
        # (Diff-Instruct, di_loss.py) sigma = exp(P_mean + P_std xi), as in EDM training
        return lognormal_sigmas(n, self.P_mean, self.P_std, device)

    fake_sigmas = dm_sigmas

    def dm_gradient(
        self, x: Tensor, x_t: Tensor, sigma: Tensor, cond: Conditioning, x0_real: Tensor, x0_fake: Tensor
    ) -> Tensor:
        # (Diff-Instruct's IKL gradient, w = sigma^2; di_loss.py) D_fake - D_real = sigma^2 (s_fake - s_real)
        return dmd_gradient(x, x0_real, x0_fake, normalize=False)

    def inject(self, x: Tensor, g: Tensor) -> Tensor:
        # (di_loss.py, gloss) sum over the sample's elements of sg(g) * x: d/dx = g per sample
        return (g.detach() * x).flatten(1).sum(1)
