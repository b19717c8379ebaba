"""Build a distillation experiment (teacher, roles, objective, data, trainer) from a Hydra config."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffdistill.models.generator import FakeScore, Generator
from diffdistill.models.teacher import Teacher
from diffdistill.objectives.base import OBJECTIVES, Objective
from diffdistill.training.ema import copy_sharing_frozen


@dataclass
class Experiment:
    teacher: Teacher
    roles: dict[str, nn.Module]
    dataset: Any
    objective: Objective | None
    objective_cls: type[Objective]


def _instantiate(node: DictConfig, what: str, **kwargs):
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, (FileNotFoundError, ValueError)):
            raise cause from None
        raise ValueError(f"could not build the {what} from its config: {cause}") from None


def build_teacher(backbone: DictConfig, dataset) -> Teacher:
    """``backbone`` builds a :class:`Teacher` (or a partial that takes ``dataset``, for analytic teachers)."""
    teacher = _instantiate(backbone, "teacher (backbone group)")
    if isinstance(teacher, functools.partial):
        teacher = teacher(dataset=dataset)
    if not isinstance(teacher, Teacher):
        teacher = Teacher(teacher)
    return teacher


def analytic_teacher(dataset, guidance_scale: float = 1.0) -> Teacher:
    """The exact teacher of a toy dataset (``GaussianToy`` / ``GaussianMixtureToy``)."""
    if not hasattr(dataset, "teacher"):
        raise ValueError(f"dataset {type(dataset).__name__} has no analytic teacher; use a toy dataset")
    return Teacher(dataset.teacher(), guidance_scale)


def objective_class(node: DictConfig) -> type[Objective]:
    target = node.get("_target_")
    if target is None:
        raise ValueError("objective config has no _target_")
    module, _, name = target.rpartition(".")
    import importlib

    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ValueError(f"objective _target_ '{target}' is not an Objective subclass")
    return cls


def _lora_student(teacher: Teacher, student: DictConfig, den: nn.Module | None) -> nn.Module:
    """The LoRA generator network of ``student.lora``; with ``share_base`` the teacher's own network, whose
    teacher view becomes a :class:`~diffdistill.models.lora.SharedBaseDenoiser` (adapters off)."""
    from diffdistill.models.generator import trainable_copy
    from diffdistill.models.lora import SharedBaseDenoiser, add_lora

    lora = student.lora
    share = bool(lora.get("share_base", True))
    if share and den is not None:
        raise ValueError(
            "student.lora.share_base needs the student to be the teacher's network (student.denoiser=null)"
        )
    if share and isinstance(teacher.denoiser, SharedBaseDenoiser):
        raise ValueError("the teacher already shares its network with a LoRA student")
    if share and not any(True for _ in teacher.denoiser.parameters()):
        raise ValueError("student.lora.share_base: the teacher has no network weights to share (analytic teacher?)")
    net = teacher.denoiser if share else (den if den is not None else trainable_copy(teacher))
    add_lora(
        net,
        rank=int(lora.get("rank", 8)),
        alpha=lora.get("alpha"),
        target_modules=list(lora.target_modules) if lora.get("target_modules") else None,
        dropout=float(lora.get("dropout", 0.0)),
    )
    if share:
        teacher.denoiser = SharedBaseDenoiser(net)
    return net.train()


def build_roles(
    objective_cls: type[Objective],
    teacher: Teacher,
    student: DictConfig,
    hparams: dict[str, Any] | None = None,
    schedule=None,
) -> dict[str, nn.Module]:
    """Build the trainable and frozen roles the objective declares (each initialised from the teacher).

    ``student.lora`` (``{rank, alpha, target_modules, dropout, share_base}``) makes the generator a LoRA student;
    with ``share_base`` (default) it shares the teacher's weights. Then the objective prepares the student
    (:meth:`Objective.prepare_student`, given the objective's hyperparameters ``hparams``). Other roles are built
    afterwards, so DMD's fake score copies the *base* network and CD/LCM's target copies the prepared student.
    """
    roles: dict[str, nn.Module] = {}
    den = _instantiate(student.denoiser, "student denoiser") if student.get("denoiser") else None
    sampling = list(student.sampling_sigmas) if student.get("sampling_sigmas") else None
    if student.get("lora"):
        roles["generator"] = Generator(_lora_student(teacher, student, den), student.sigma_init, sampling)
    elif den is not None:
        roles["generator"] = Generator(den, student.sigma_init, sampling)
    else:
        roles["generator"] = Generator.from_teacher(teacher, student.sigma_init, sampling)
    context = {"teacher": teacher, **({"schedule": schedule} if schedule is not None else {}), **(hparams or {})}
    objective_cls.prepare_student(roles["generator"], **objective_cls.student_hparams(context))
    for r in (*objective_cls.roles, *objective_cls.frozen_roles):
        if r in roles:
            continue
        if r == "fake_score":
            roles[r] = FakeScore.from_teacher(teacher)
        elif r == "target_generator":  # frozen parts of the generator (a LoRA base) are shared, not copied
            roles[r] = copy_sharing_frozen(roles["generator"])
        else:
            roles[r] = objective_cls.build_role(r, teacher=teacher, roles=roles)
    for r in objective_cls.frozen_roles:
        roles[r].requires_grad_(False)
    return roles


def make_objective(
    node: DictConfig, objective_cls: type[Objective], teacher: Teacher, roles: dict[str, nn.Module], schedule=None
) -> Objective:
    factory = _instantiate(node, f"objective '{objective_cls.name}'")
    params = inspect.signature(objective_cls.__init__).parameters
    kw: dict[str, Any] = {"teacher": teacher}
    kw.update({k: v for k, v in roles.items() if k in params})
    if "schedule" in params and schedule is not None and "schedule" not in (factory.keywords or {}):
        kw["schedule"] = schedule
    try:
        return factory(**kw)
    except TypeError as e:
        raise ValueError(f"objective '{objective_cls.name}': {e}") from None


def build_experiment(cfg: DictConfig, with_objective: bool = True) -> Experiment:
    """Everything except the trainer: dataset, teacher, roles and (optionally) the objective.

    Seeds every RNG with ``trainer.seed`` first, so randomly initialised modules are reproducible.
    """
    from diffdistill.training.checkpoint import seed_everything

    seed_everything(int(cfg.get("trainer", {}).get("seed", 0)))
    dataset = _instantiate(cfg.data, "dataset (data group)")
    teacher = build_teacher(cfg.backbone, dataset)
    objective_cls = objective_class(cfg.objective)
    if objective_cls.name not in OBJECTIVES:
        raise ValueError(f"objective {objective_cls.__name__} is not registered")
    schedule = _instantiate(cfg.schedule, "schedule") if cfg.get("schedule") else None
    hparams = OmegaConf.to_container(cfg.objective, resolve=True)
    hparams = {k: v for k, v in hparams.items() if k[0] != "_" and not isinstance(v, dict)}
    roles = build_roles(objective_cls, teacher, cfg.student, hparams, schedule)
    obj = make_objective(cfg.objective, objective_cls, teacher, roles, schedule) if with_objective else None
    return Experiment(teacher, roles, dataset, obj, objective_cls)


def build_trainer(cfg: DictConfig, evaluator=None):
    """The full run: experiment + :class:`DistillTrainer` with the resolved config recorded."""
    from diffdistill.training.logging import LoggerConfig
    from diffdistill.training.trainer import DistillTrainer, TrainerConfig

    logger = _instantiate(cfg.logger, "logger (logger group)") if cfg.get("logger") else None
    if logger is not None and not isinstance(logger, LoggerConfig):
        raise ValueError("logger group must build a LoggerConfig")
    exp = build_experiment(cfg)
    tcfg = _instantiate(cfg.trainer, "trainer")
    if not isinstance(tcfg, TrainerConfig):
        raise ValueError("trainer group must build a TrainerConfig")
    optim = _instantiate(cfg.optim, "optimizer (optim group)")
    roles = dict(exp.roles)
    return DistillTrainer(
        exp.objective,
        roles,
        exp.teacher,
        exp.dataset,
        cfg.run_dir,
        tcfg,
        optim,
        evaluator,
        OmegaConf.to_container(cfg, resolve=True),
        logger=logger,
    )


def build_evaluator(cfg: DictConfig):
    """The in-loop evaluator of the ``eval`` group, or ``None`` when the group builds no callable."""
    if not cfg.get("eval"):
        return None
    ev = _instantiate(cfg.eval, "evaluator (eval group)")
    if isinstance(ev, functools.partial):
        exp_data = _instantiate(cfg.data, "dataset (data group)")
        ev = ev(reference=exp_data)
    return ev if callable(ev) and not isinstance(ev, dict) else None
