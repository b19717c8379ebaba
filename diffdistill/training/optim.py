"""Optimiser and learning-rate schedule per trainable role."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class OptimizerSpec:
    """One optimiser per trainable role; learning rates may differ per role.

    Args:
        name: ``adamw`` or ``adam``.
        lr: default learning rate; ``lr_per_role`` overrides it (e.g. ``{fake_score: 1e-4}``).
        betas, weight_decay, eps: Adam(W) hyperparameters (DMD2: betas (0.9, 0.999), wd 0.01).
        warmup_steps: linear warm-up of the LR from 0 (DMD2: 500).
        fused: use the fused (CUDA) / foreach implementation where available.
        betas_per_role: per-role betas (SiD uses beta1 = 0).
    """

    name: str = "adamw"
    lr: float = 2e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 500
    fused: bool = False
    lr_per_role: dict[str, float] = field(default_factory=dict)
    betas_per_role: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from diffdistill.utils.validate import require

        require(self.name in ("adamw", "adam", "radam"), "optim.name", "must be adamw, adam or radam", self.name)
        for key in ("lr", "eps"):
            v = getattr(self, key)
            require(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, f"optim.{key}", "must be > 0", v)
        wd, warm = self.weight_decay, self.warmup_steps
        require(isinstance(wd, (int, float)) and wd >= 0, "optim.weight_decay", "must be >= 0", wd)
        require(
            isinstance(warm, int) and not isinstance(warm, bool) and warm >= 0,
            "optim.warmup_steps",
            "must be an integer >= 0",
            warm,
        )
        for key, betas in [
            ("optim.betas", self.betas),
            *((f"optim.betas_per_role.{k}", b) for k, b in self.betas_per_role.items()),
        ]:
            ok = len(list(betas)) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
            require(ok, key, "must be two numbers in [0, 1)", betas)
        for k, v in self.lr_per_role.items():
            require(isinstance(v, (int, float)) and v > 0, f"optim.lr_per_role.{k}", "must be > 0", v)

    def build(self, role: str, module: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"role '{role}' has no trainable parameters")
        lr = float(self.lr_per_role.get(role, self.lr))
        betas = tuple(self.betas_per_role.get(role, self.betas))
        kw = {"lr": lr, "betas": betas, "eps": self.eps}
        if self.fused and torch.cuda.is_available() and self.name != "radam":
            kw["fused"] = True
        elif self.fused:
            kw["foreach"] = True
        if self.name == "adamw":
            opt = torch.optim.AdamW(params, weight_decay=self.weight_decay, **kw)
        elif self.name == "adam":
            opt = torch.optim.Adam(params, weight_decay=self.weight_decay, **kw)
        elif self.name == "radam":  # consistency models (Song et al. 2023) and ECT
            opt = torch.optim.RAdam(params, weight_decay=self.weight_decay, **kw)
        else:
            raise ValueError(f"unknown optimizer '{self.name}' (use 'adamw', 'adam' or 'radam')")
        warm = max(1, int(self.warmup_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return opt, sched
