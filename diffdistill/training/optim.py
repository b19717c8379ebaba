"""Optimiser and learning-rate schedule per trainable role (the ``optim`` config group).

Any optimiser: a built-in shortcut by ``name`` (``adamw``, ``adam``, ``radam``, ``adamw8bit`` from bitsandbytes,
``prodigy`` from prodigyopt) or any ``torch.optim`` class through Hydra (``optimizer: {_target_: torch.optim.SGD,
_partial_: true, momentum: 0.9}`` with ``name: null``). Schedules are diffusers' ``get_scheduler`` (``constant``,
``constant_with_warmup``, ``linear``, ``cosine``, ``cosine_with_restarts``, ``polynomial``), stepped once per update
of the role.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# name -> (module, class, pip package); the optional ones are imported only when chosen
BUILTIN: dict[str, tuple[str, str, str | None]] = {
    "adamw": ("torch.optim", "AdamW", None),
    "adam": ("torch.optim", "Adam", None),
    "radam": ("torch.optim", "RAdam", None),  # consistency models (Song et al. 2023) and ECT
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),  # 8-bit states (Dettmers et al. 2022)
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),  # learning-rate-free Adam (Mishchenko & Defazio 2023)
}
# schedule name -> the options diffusers' get_scheduler takes for it besides warm-up and length
SCHEDULES: dict[str, tuple[str, ...]] = {
    "constant": (),
    "constant_with_warmup": (),
    "linear": (),
    "cosine": (),
    "cosine_with_restarts": ("num_cycles",),
    "polynomial": ("power",),
}
NEEDS_LENGTH = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plain(value: Any) -> Any:
    """An OmegaConf container as plain Python (Hydra passes nested nodes without ``_target_`` as DictConfig)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def count_generator_updates(schedule, max_steps: int) -> int:
    """Generator updates in ``max_steps`` iterations of an :class:`~diffdistill.objectives.base.UpdateSchedule`."""
    from diffdistill.objectives.base import UpdateSchedule

    if type(schedule).is_generator_step is UpdateSchedule.is_generator_step:
        n = max(0, max_steps - schedule.generator_warmup_steps)
        return -(-n // schedule.critic_steps_per_generator_step)
    return sum(1 for s in range(max_steps) if schedule.is_generator_step(s))


@dataclass
class OptimizerSpec:
    """One optimiser (and LR schedule) per trainable role; learning rates and betas may differ per role.

    Args:
        name: a built-in optimiser (``adamw``, ``adam``, ``radam``, ``adamw8bit``, ``prodigy``), or ``null`` when
            ``optimizer`` is given.
        lr: default learning rate; ``lr_per_role`` overrides it (DMD2: different fake-score and generator rates).
        betas, weight_decay, eps: passed to the optimiser when set; ``null`` = the optimiser's own default.
        warmup_steps: updates of linear LR warm-up from 0 (DMD2: 500); needs a schedule with a warm-up.
        fused: fused kernels for parameters on CUDA, ``foreach`` ones elsewhere, where the optimiser has them.
        lr_per_role: per-role learning rates, e.g. ``{fake_score: 1e-4}``.
        betas_per_role: per-role betas (SiD: ``{generator: [0, 0.999], fake_score: [0, 0.999]}``).
        schedule: diffusers ``get_scheduler`` name, or ``{name: ..., num_cycles: ..., power: ...}``
            (``configs/optim/schedule/*.yaml``); ``linear``/``cosine``/... decay over the role's updates in
            ``trainer.max_steps`` iterations.
        optimizer: a callable ``optimizer(params, lr=..., ...) -> torch.optim.Optimizer``, e.g. Hydra's
            ``{_target_: torch.optim.SGD, _partial_: true, momentum: 0.9}``; requires ``name: null``.
    """

    name: str | None = "adamw"
    lr: float = 2e-6
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    eps: float | None = None
    warmup_steps: int = 500
    fused: bool = False
    lr_per_role: dict[str, float] = field(default_factory=dict)
    betas_per_role: dict[str, tuple[float, float]] = field(default_factory=dict)
    schedule: Any = "constant_with_warmup"
    optimizer: Callable[..., torch.optim.Optimizer] | None = None

    def __post_init__(self) -> None:
        from diffdistill.utils.validate import require

        for key in ("lr_per_role", "betas_per_role"):
            value = _plain(getattr(self, key)) or {}
            require(isinstance(value, Mapping), f"optim.{key}", "must be a mapping {role: value}", value)
            setattr(self, key, dict(value))
        pairs = {"optim.betas": _plain(self.betas)} if self.betas is not None else {}
        pairs.update({f"optim.betas_per_role.{k}": v for k, v in self.betas_per_role.items()})
        for key, betas in pairs.items():
            ok = isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)
            require(ok, key, "must be two numbers in [0, 1)", betas)
        self.betas = None if self.betas is None else tuple(_plain(self.betas))
        self.betas_per_role = {k: tuple(v) for k, v in self.betas_per_role.items()}
        if self.optimizer is not None:
            require(
                callable(self.optimizer),
                "optim.optimizer",
                "must be a _target_ config with _partial_: true",
                self.optimizer,
            )
            require(
                self.name is None,
                "optim.name",
                "must be null when optim.optimizer is given (the optimizer is the optimizer's _target_)",
                self.name,
            )
        else:
            names = ", ".join(BUILTIN)
            require(
                self.name in BUILTIN, "optim.name", f"must be one of {names} (or null with optim.optimizer)", self.name
            )
        require(_number(self.lr) and self.lr > 0, "optim.lr", "must be > 0", self.lr)
        require(self.eps is None or (_number(self.eps) and self.eps > 0), "optim.eps", "must be > 0 or null", self.eps)
        wd, warm = self.weight_decay, self.warmup_steps
        require(wd is None or (_number(wd) and wd >= 0), "optim.weight_decay", "must be >= 0 or null", wd)
        require(
            isinstance(warm, int) and not isinstance(warm, bool) and warm >= 0,
            "optim.warmup_steps",
            "must be an integer >= 0",
            warm,
        )
        require(isinstance(self.fused, bool), "optim.fused", "must be true or false", self.fused)
        for k, v in self.lr_per_role.items():
            require(_number(v) and v > 0, f"optim.lr_per_role.{k}", "must be > 0", v)
        self.schedule_name, self.schedule_options = self._parse_schedule(_plain(self.schedule))
        if self.schedule_name == "constant":
            require(
                warm == 0,
                "optim.warmup_steps",
                "must be 0 with optim.schedule=constant (or use constant_with_warmup)",
                warm,
            )

    @staticmethod
    def _parse_schedule(schedule: Any) -> tuple[str, dict[str, Any]]:
        if isinstance(schedule, str):
            schedule = {"name": schedule}
        if not isinstance(schedule, Mapping) or not isinstance(schedule.get("name"), str):
            raise ValueError(f"optim.schedule must be a schedule name or {{name: ...}}, got {schedule!r}")
        name, options = schedule["name"], {k: v for k, v in schedule.items() if k != "name"}
        if name not in SCHEDULES:
            raise ValueError(f"optim.schedule.name must be one of {', '.join(SCHEDULES)}, got {name!r}")
        extra = sorted(set(options) - set(SCHEDULES[name]))
        if extra:
            raise ValueError(f"optim.schedule.{extra[0]} is not an option of the {name} schedule")
        for k, v in options.items():
            if not (_number(v) and v > 0):
                raise ValueError(f"optim.schedule.{k} must be a number > 0, got {v!r}")
        return name, options

    @property
    def needs_num_updates(self) -> bool:
        """Whether the schedule decays over the run (``build`` then needs each role's number of updates)."""
        return self.schedule_name in NEEDS_LENGTH

    def optimizer_factory(self) -> tuple[Callable[..., torch.optim.Optimizer], str]:
        """``(callable, label)``: the optimiser to call with ``(params, lr=..., ...)``."""
        if self.optimizer is not None:
            func = getattr(self.optimizer, "func", self.optimizer)
            return self.optimizer, getattr(func, "__qualname__", repr(func))
        module, cls, package = BUILTIN[self.name]
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"optim.name={self.name} needs the {package} package, which is not installed: pip install {package} "
                "(bitsandbytes needs a CUDA GPU), or choose another optimiser (optim=adamw)"
            )
        return getattr(importlib.import_module(module), cls), f"{module}.{cls}"

    def role_kwargs(self, role: str) -> dict[str, Any]:
        """The keyword arguments this spec sets for ``role``'s optimiser (unset ones are the optimiser's)."""
        kw: dict[str, Any] = {"lr": float(self.lr_per_role.get(role, self.lr))}
        betas = self.betas_per_role.get(role, self.betas)
        for key, value in (("betas", betas), ("eps", self.eps), ("weight_decay", self.weight_decay)):
            if value is not None:
                kw[key] = tuple(float(b) for b in value) if key == "betas" else float(value)
        return kw

    def build(
        self, role: str, module: nn.Module, num_updates: int | None = None
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimiser of ``role``'s trainable parameters and its schedule over ``num_updates`` updates."""
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"role '{role}' has no trainable parameters")
        factory, label = self.optimizer_factory()
        kw = self.role_kwargs(role)
        try:
            sig = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            sig = {}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
        for key in kw:
            if sig and not takes_any and key not in sig:
                raise ValueError(f"optim.{key}: {label} takes no '{key}' argument (set optim.{key}=null)")
        if self.fused:
            if "fused" in sig and all(p.is_cuda for p in params):
                kw["fused"] = True
            elif "foreach" in sig:
                kw["foreach"] = True
        opt = factory(params, **kw)
        return opt, self.build_schedule(opt, num_updates)

    def build_schedule(self, opt: torch.optim.Optimizer, num_updates: int | None) -> torch.optim.lr_scheduler.LambdaLR:
        """diffusers' ``get_scheduler`` for ``optim.schedule`` (a ``LambdaLR``: old checkpoints' states load)."""
        from diffusers.optimization import get_scheduler

        name = self.schedule_name
        if name in NEEDS_LENGTH:
            if num_updates is None:
                raise ValueError(f"optim.schedule={name} decays over the run: build needs the role's number of updates")
            if num_updates <= self.warmup_steps:
                raise ValueError(
                    f"optim.warmup_steps={self.warmup_steps} leaves nothing of the {num_updates} updates of the "
                    f"{name} schedule (trainer.max_steps too small or warm-up too long)"
                )
        return get_scheduler(
            name, opt, num_warmup_steps=self.warmup_steps, num_training_steps=num_updates, **self.schedule_options
        )
