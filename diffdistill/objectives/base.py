"""The objective contract (docs/architecture.md §3): what every distillation method implements.

An objective is a plain object built by keyword from the roles it needs (``teacher``, ``generator`` and,
per method, ``fake_score``, ``discriminator``, ``target_generator``) plus its hyperparameters, whose
defaults are the paper's. It returns per-sample losses; the trainer owns backward, optimisers,
gradient state, devices and precision.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

OBJECTIVES: dict[str, type[Objective]] = {}


@dataclass(frozen=True)
class Paper:
    title: str
    arxiv: str
    authors: str = ""
    year: int | None = None


@dataclass
class LossOutput:
    """A per-sample loss ``[B]`` (the trainer reduces it) and detached scalars for logging."""

    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss.ndim != 1:
            raise ValueError(f"LossOutput.loss must be per-sample [B], got shape {tuple(self.loss.shape)}")


@dataclass
class UpdateSchedule:
    """How critic and generator updates interleave.

    Each training iteration performs one critic update (when the objective has a critic) and, on
    iterations where :meth:`is_generator_step` holds, one generator update before it.

    Args:
        critic_steps_per_generator_step: DMD2's TTUR ratio (5 on ImageNet: 5 fake updates per generator update).
        generator_warmup_steps: critic-only iterations at the start.
    """

    critic_steps_per_generator_step: int = 1
    generator_warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.critic_steps_per_generator_step < 1:
            raise ValueError(
                f"critic_steps_per_generator_step must be >= 1, got {self.critic_steps_per_generator_step}"
            )
        if self.generator_warmup_steps < 0:
            raise ValueError(f"generator_warmup_steps must be >= 0, got {self.generator_warmup_steps}")

    def is_generator_step(self, step: int) -> bool:
        if step < self.generator_warmup_steps:
            return False
        return (step - self.generator_warmup_steps) % self.critic_steps_per_generator_step == 0


@dataclass(frozen=True)
class PassCount:
    """Network passes of one training iteration, in units of one forward of the backbone at the batch size.

    ``forward`` counts forwards without a graph; ``forward_grad`` forwards that build a graph;
    ``backward`` backward passes (each ~2 forwards); ``jvp`` forward-mode passes. Used by the benchmarks
    to compare measured cost with the pass-count estimate (benchmarks/README.md, Method).
    """

    forward: float = 0.0
    forward_grad: float = 0.0
    backward: float = 0.0
    jvp: float = 0.0

    def cost(self, backward_cost: float = 2.0, jvp_cost: float = 3.0) -> float:
        """Estimated cost relative to one no-grad forward."""
        return self.forward + self.forward_grad + backward_cost * self.backward + jvp_cost * self.jvp


class Objective:
    """Base class of every distillation objective.

    Class attributes:
        name: registry key (also the config file name under ``configs/objective``).
        paper: the citation.
        roles: trainable roles the trainer must build, optimise and checkpoint.
        frozen_roles: non-trainable roles the trainer builds and checkpoints (e.g. an EMA target).
        generator_roles: the trainable roles updated by :meth:`generator_loss` (the others are critics,
            updated by :meth:`critic_loss`).
        requires_real_data: whether batches must carry real samples (GAN terms, consistency training).
        student_sampler: how the sample grids draw from the student: ``"one_step"`` (a distilled generator) or
            ``"heun"`` (the objective trains a denoiser, sampled like a teacher: EDM training).
        few_step_student: whether the student is trained to be sampled in several steps too (consistency
            models' multistep sampling, backward simulation); one-step generators (DMD, SiD) are not.
        built_roles: roles the generic builder knows (``fake_score``) that this objective builds itself with
            :meth:`build_role` instead (VSD's LoRA fake score); the network a config gives for the role
            (``fake_score.denoiser``) is then passed in ``roles`` under the role's name.

    The hooks the trainer and the builder call are all declared here with their defaults; an objective
    overrides only what it needs.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[Paper | None] = None
    roles: ClassVar[tuple[str, ...]] = ("generator",)
    frozen_roles: ClassVar[tuple[str, ...]] = ()
    generator_roles: ClassVar[tuple[str, ...]] = ("generator",)
    requires_real_data: ClassVar[bool] = False
    student_sampler: ClassVar[str] = "one_step"
    few_step_student: ClassVar[bool] = False
    built_roles: ClassVar[tuple[str, ...]] = ()
    update_schedule: UpdateSchedule = UpdateSchedule()

    @classmethod
    def prepare_student(cls, generator: nn.Module, **hparams: Any) -> None:
        """Change the student the way this method's parametrisation needs (a boundary condition, a guidance
        embedding, an extra trained head), in place, before any other role is copied from it or any optimiser
        sees it. It receives the objective's hyperparameters that its signature names (the builder passes them
        from the config). The change is recorded by the student's own config
        (``diffdistill.models.io.model_config``), so a saved student loads without the objective. Default: none.
        """

    @classmethod
    def student_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """The subset of ``hparams`` that :meth:`prepare_student` takes."""
        params = inspect.signature(cls.prepare_student).parameters
        return {k: v for k, v in hparams.items() if k in params and k != "generator"}

    @classmethod
    def create(cls, **kwargs: Any) -> Objective:
        """Prepare the student (and a given target copy of it), then construct: what the builder does, for code
        that builds objectives by hand."""
        for role in ("generator", "target_generator"):
            if kwargs.get(role) is not None:
                cls.prepare_student(kwargs[role], **cls.student_hparams(kwargs))
        return cls(**kwargs)

    @classmethod
    def build_role(
        cls, name: str, teacher: nn.Module, roles: dict[str, nn.Module], hparams: dict[str, Any] | None = None
    ) -> nn.Module:
        """Build a role the generic builder does not know (it knows ``generator``, ``fake_score`` and
        ``target_generator``); ``roles`` holds those built so far, ``hparams`` the objective's config values
        (nested mappings included, e.g. DMD2's ``discriminator_heads``; empty for code that builds roles by hand)."""
        raise ValueError(f"objective '{cls.name}' declares role '{name}' but does not build it (override build_role)")

    def generator_loss(self, batch, step: int) -> LossOutput:
        raise NotImplementedError

    def critic_loss(self, batch, step: int) -> LossOutput | None:
        return None

    def on_step_end(self, step: int) -> None:
        """Hook after each iteration (target-network EMA updates)."""

    def state_dict(self) -> dict[str, Any]:
        """Objective state that is not a role (counters, running statistics); saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"objective '{self.name}' keeps no state, but the checkpoint holds {sorted(state)}")

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        """Frozen helper networks of the loss that are not roles (e.g. LPIPS); the trainer places them."""
        return {}

    def pass_count(self) -> PassCount:
        """Backbone passes of one iteration (averaged over the update schedule)."""
        raise NotImplementedError


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: add ``cls`` to :data:`OBJECTIVES` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in OBJECTIVES and OBJECTIVES[cls.name] is not cls:
        raise ValueError(f"objective name '{cls.name}' is already registered by {OBJECTIVES[cls.name].__name__}")
    OBJECTIVES[cls.name] = cls
    return cls
