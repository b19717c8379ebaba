"""Build a distillation experiment (teacher, roles, objective, data, trainer) from a Hydra config."""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffdistill.models.generator import INPUT_NOISE, FakeScore, Generator
from diffdistill.models.teacher import Teacher
from diffdistill.objectives.base import OBJECTIVES, Objective
from diffdistill.training.ema import copy_sharing_frozen

log = logging.getLogger("diffdistill")


@dataclass
class Experiment:
    teacher: Teacher
    roles: dict[str, nn.Module]
    dataset: Any
    objective: Objective | None
    objective_cls: type[Objective]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _target_callable(node: DictConfig):
    from hydra._internal.utils import _locate

    try:
        return _locate(str(node.get("_target_")))
    except Exception:  # noqa: BLE001 - a bad _target_ is reported by instantiate itself
        return None


def _check_node_types(node: DictConfig, group: str) -> None:
    """Each top-level value of ``node`` has the type that its ``_target_``'s signature annotates."""
    import typing

    from diffdistill.utils.validate import check_value

    target = _target_callable(node)
    try:
        hints = typing.get_type_hints(target) if target is not None else {}
    except Exception:  # noqa: BLE001 - annotations that do not resolve: nothing to check against
        return
    if isinstance(target, type):
        try:
            hints = typing.get_type_hints(target.__init__)
        except Exception:  # noqa: BLE001
            return
    for k, v in node.items():
        nested = OmegaConf.is_dict(v) and "_target_" in v
        if not str(k).startswith("_") and k in hints and not nested:
            check_value(f"{group}.{k}", OmegaConf.to_container(v) if OmegaConf.is_config(v) else v, hints[k])


def _culprit_key(node: DictConfig, kwargs: dict) -> str | None:
    """The one value of ``node`` whose reset to the ``_target_``'s default lets it build (to name it in errors)."""
    target = _target_callable(node)
    try:
        params = inspect.signature(target).parameters if target is not None else {}
    except (TypeError, ValueError):
        return None
    for k in node:
        p = params.get(k)
        if p is None or p.default is inspect.Parameter.empty or OmegaConf.is_config(node[k]) or node[k] == p.default:
            continue
        trial = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
        try:
            trial[k] = p.default  # a dataclass default_factory sentinel is no config value: not this key
            instantiate(trial, **kwargs)
        except Exception:  # noqa: BLE001 - still failing: not this key
            continue
        return k
    return None


def _instantiate(node: DictConfig, what: str, group: str | None = None, **kwargs):
    """Hydra's instantiate, with a failure reported as one line naming the key to fix (``group.key`` when the
    values' types or one value is to blame, else the group)."""
    if group is not None and OmegaConf.is_dict(node):
        _check_node_types(node, group)
    try:
        return instantiate(node, **kwargs)
    except Exception as e:  # noqa: BLE001 - hydra wraps the builder's own error; a malformed node fails here too
        cause = (e.__cause__ or e) if isinstance(e, InstantiationException) else e
        if isinstance(cause, FileNotFoundError):
            raise cause from None
        key = _culprit_key(node, kwargs) if group is not None and OmegaConf.is_dict(node) else None
        where = f"{group}.{key}={node[key]!r}: " if key is not None else ""
        if isinstance(cause, ValueError):
            raise ValueError(f"{where}{_one_line(cause)}") from None
        raise ValueError(f"{where}could not build the {what} from its config: {_one_line(cause)}") from None


def check_student(student: DictConfig) -> None:
    """The ``student`` block of the run config: types and ranges, each failure naming its key."""
    den = student.get("denoiser")
    if den is not None and not (isinstance(den, DictConfig) and "_target_" in den):
        raise ValueError(f"student.denoiser must be null (a copy of the teacher) or a _target_ config, got {den!r}")
    s = student.get("sigma_init")
    if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0):
        raise ValueError(f"student.sigma_init must be null (the teacher's sigma_max) or a number > 0, got {s!r}")
    sig = student.get("sampling_sigmas")
    if sig is not None:
        ok = (OmegaConf.is_list(sig) or isinstance(sig, (list, tuple))) and len(sig) > 0  # a resolver gives a list
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in sig)
        if not ok:
            raise ValueError(f"student.sampling_sigmas must be null or a non-empty list of sigmas > 0, got {sig!r}")
    noise = student.get("input_noise", "prior")
    if noise not in INPUT_NOISE:
        raise ValueError(
            f"student.input_noise must be one of {list(INPUT_NOISE)} (prior: the denoiser's prior_std(sigma) z, unit "
            f"noise in a VP/flow model's native space; sigma: sigma z, SiD-LSG's input), got {noise!r}"
        )
    lora = student.get("lora")
    if lora is not None:
        known = {"rank", "alpha", "target_modules", "dropout", "share_base"}
        if not isinstance(lora, DictConfig) or set(lora) - known:
            raise ValueError(f"student.lora must be null or a mapping with keys {sorted(known)}, got {lora!r}")
        rank = lora.get("rank", 8)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"student.lora.rank must be an integer >= 1, got {rank!r}")


def check_network_key(node, key: str) -> None:
    """``key`` (``student.denoiser``, ``fake_score.denoiser``) is null or a ``_target_`` config."""
    if node is not None and not (isinstance(node, DictConfig) and "_target_" in node):
        raise ValueError(f"{key} must be null (a copy of the teacher) or a _target_ config, got {node!r}")


def _network(node: DictConfig | None, teacher: Teacher, what: str) -> nn.Module | None:
    """The role network of ``node`` (``None`` for null); a partial builder (``_partial_: true``, e.g.
    :func:`diffdistill.models.fit.fit_to_teacher`) is given the teacher."""
    if node is None:
        return None
    net = _instantiate(node, what)
    if isinstance(net, functools.partial):
        try:
            net = net(teacher=teacher)
        except ValueError as e:
            raise ValueError(f"{what}: {_one_line(e)}") from None
    return net


def require_weights(role: nn.Module, key: str, what: str) -> None:
    """A trainable role without trainable parameters (a copy of a weightless analytic teacher) fails naming the
    config key that gives it a network."""
    if not any(p.requires_grad for p in role.parameters()):
        raise ValueError(
            f"the {what} has no trainable parameters: the teacher has no network weights to copy (backbone=analytic?)."
            f" Give it a network with {key}=<_target_ config>, e.g. {key.replace('.', '/')}=toy_mlp for flat toy data"
        )


def build_teacher(backbone: DictConfig, dataset) -> Teacher:
    """``backbone`` builds a :class:`Teacher` (or a partial that takes ``dataset``, for analytic teachers)."""
    teacher = _instantiate(backbone, "teacher (backbone group)", "backbone")
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


def schedule_within_teacher(schedule, teacher: Teacher):
    """``schedule``, or ``None`` (the teacher's own noise levels: an SD teacher's 1000 DDPM timesteps) when its range
    leaves the teacher's: the default Karras grid ``[0.002, 80]`` on an SD teacher (``[0.029, 14.6]``) would ask the
    teacher for noise levels it was never trained on. Logged, since the group was chosen (by default or by hand)."""
    lo, hi = getattr(schedule, "sigma_min", None), getattr(schedule, "sigma_max", None)
    if lo is None or hi is None or not isinstance(lo, (int, float)):
        return schedule
    t_lo, t_hi = float(teacher.sigma_min), float(teacher.sigma_max)
    if lo >= t_lo * (1 - 1e-6) and hi <= t_hi * (1 + 1e-6):
        return schedule
    log.info(
        "schedule [%g, %g] leaves the teacher's noise range [%g, %g]: using the teacher's own noise levels "
        "(set schedule.sigma_min/sigma_max inside that range to keep a Karras grid)",
        lo,
        hi,
        t_lo,
        t_hi,
    )
    return None


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
    fake_score: DictConfig | None = None,
) -> dict[str, nn.Module]:
    """Build the trainable and frozen roles the objective declares (each initialised from the teacher).

    ``student.lora`` (``{rank, alpha, target_modules, dropout, share_base}``) makes the generator a LoRA student;
    with ``share_base`` (default) it shares the teacher's weights. Then the objective prepares the student
    (:meth:`Objective.prepare_student`, given the objective's hyperparameters ``hparams``). Other roles are built
    afterwards, so DMD's fake score copies the *base* network and CD/LCM's target copies the prepared student.
    ``fake_score.denoiser`` (a ``_target_`` config; ``None`` = a trainable copy of the teacher) is the fake score's
    network. A teacher without weights (``backbone=analytic``) has no network to copy: the student and the fake
    score then need their own (``student.denoiser``, ``fake_score.denoiser``), and an error names the missing key.
    """
    check_student(student)
    if fake_score is not None:
        check_network_key(fake_score.get("denoiser"), "fake_score.denoiser")
    roles: dict[str, nn.Module] = {}
    den = _network(student.get("denoiser"), teacher, "student network (student.denoiser)")
    sampling = list(student.sampling_sigmas) if student.get("sampling_sigmas") else None
    # null: the teacher's largest noise level (80 for EDM teachers, about 14.6 for SD's DDPM schedule)
    sigma_init = float(student.sigma_init) if student.get("sigma_init") is not None else float(teacher.sigma_max)
    if student.get("lora"):
        roles["generator"] = Generator(_lora_student(teacher, student, den), sigma_init, sampling)
    elif den is not None:
        roles["generator"] = Generator(den, sigma_init, sampling)
    else:
        roles["generator"] = Generator.from_teacher(teacher, sigma_init, sampling)
    roles["generator"].input_noise = str(student.get("input_noise", "prior"))  # recorded in its config
    require_weights(roles["generator"], "student.denoiser", "student")
    context = {"teacher": teacher, **({"schedule": schedule} if schedule is not None else {}), **(hparams or {})}
    objective_cls.prepare_student(roles["generator"], **objective_cls.student_hparams(context))
    for r in (*objective_cls.roles, *objective_cls.frozen_roles):
        if r in roles:
            continue
        if r == "fake_score":
            fake = fake_score.get("denoiser") if fake_score is not None else None
            if fake is not None:
                roles[r] = FakeScore(_network(fake, teacher, "fake-score network (fake_score.denoiser)").train())
            elif r not in objective_cls.built_roles:
                roles[r] = FakeScore.from_teacher(teacher)
            if r in objective_cls.built_roles:  # the objective's own fake score (given the configured network)
                roles[r] = objective_cls.build_role(r, teacher=teacher, roles=roles, hparams=dict(hparams or {}))
            require_weights(roles[r], "fake_score.denoiser", "fake score")
        elif r == "target_generator":  # frozen parts of the generator (a LoRA base) are shared, not copied
            roles[r] = copy_sharing_frozen(roles["generator"])
        else:
            roles[r] = objective_cls.build_role(r, teacher=teacher, roles=roles, hparams=dict(hparams or {}))
    for r in objective_cls.frozen_roles:
        roles[r].requires_grad_(False)
    return roles


def check_objective_config(objective_cls: type[Objective], hparams: dict[str, Any]) -> None:
    """Each hyperparameter has the type its constructor annotates (``objective.<key> must be ...``)."""
    import typing

    from diffdistill.utils.validate import check_value

    try:
        hints = typing.get_type_hints(objective_cls.__init__)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: nothing to check against
        return
    for k, v in hparams.items():
        if k in hints:
            check_value(f"objective.{k}", v, hints[k])


def _culprit(objective_cls: type[Objective], kwargs: dict[str, Any]) -> str | None:
    """The one hyperparameter whose reset to its default lets the constructor succeed (to name it in the error)."""
    params = inspect.signature(objective_cls.__init__).parameters
    for k, v in kwargs.items():
        default = params[k].default if k in params else inspect.Parameter.empty
        if default is inspect.Parameter.empty or v == default:
            continue
        try:
            objective_cls(**{**kwargs, k: default})
        except Exception:  # noqa: BLE001 - still failing: not this key
            continue
        return k
    return None


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
    except Exception as e:  # noqa: BLE001 - a constructor's own check, or a value it could not use
        given = dict(factory.keywords or {})
        key = _culprit(objective_cls, {**given, **kw}) if not isinstance(e, TypeError) else None
        where = f"objective.{key}={given[key]!r}" if key in given else f"objective '{objective_cls.name}'"
        raise ValueError(f"{where}: {_one_line(e)}") from None


def build_experiment(cfg: DictConfig, with_objective: bool = True) -> Experiment:
    """Everything except the trainer: dataset, teacher, roles and (optionally) the objective.

    Seeds every RNG with ``trainer.seed`` first, so randomly initialised modules are reproducible.
    """
    from diffdistill.training.checkpoint import seed_everything
    from diffdistill.utils.validate import check_value

    seed_everything(check_value("trainer.seed", cfg.get("trainer", {}).get("seed", 0), int))
    dataset = _instantiate(cfg.data, "dataset (data group)", "data")
    teacher = build_teacher(cfg.backbone, dataset)
    objective_cls = objective_class(cfg.objective)
    if objective_cls.name not in OBJECTIVES:
        raise ValueError(f"objective {objective_cls.__name__} is not registered")
    schedule = _instantiate(cfg.schedule, "schedule", "schedule") if cfg.get("schedule") else None
    schedule = schedule_within_teacher(schedule, teacher)
    hparams = OmegaConf.to_container(cfg.objective, resolve=True)
    check_objective_config(objective_cls, {k: v for k, v in hparams.items() if k[0] != "_"})
    hparams = {k: v for k, v in hparams.items() if k[0] != "_"}  # nested mappings too: build_role may read them
    roles = build_roles(objective_cls, teacher, cfg.student, hparams, schedule, cfg.get("fake_score"))
    obj = make_objective(cfg.objective, objective_cls, teacher, roles, schedule) if with_objective else None
    return Experiment(teacher, roles, dataset, obj, objective_cls)


def build_trainer(cfg: DictConfig, evaluator=None):
    """The full run: experiment + :class:`DistillTrainer` with the resolved config recorded."""
    from diffdistill.training.logging import LoggerConfig
    from diffdistill.training.trainer import DistillTrainer, TrainerConfig

    logger = _instantiate(cfg.logger, "logger (logger group)", "logger") if cfg.get("logger") else None
    if logger is not None and not isinstance(logger, LoggerConfig):
        raise ValueError("logger group must build a LoggerConfig")
    exp = build_experiment(cfg)
    tcfg = _instantiate(cfg.trainer, "trainer", "trainer")
    if not isinstance(tcfg, TrainerConfig):
        raise ValueError("trainer group must build a TrainerConfig")
    optim = _instantiate(cfg.optim, "optimizer (optim group)", "optim")
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
        exp_data = _instantiate(cfg.data, "dataset (data group)", "data")
        ev = ev(reference=exp_data)
    return ev if callable(ev) and not isinstance(ev, dict) else None
