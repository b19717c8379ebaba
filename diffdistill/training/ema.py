"""Exponential moving average of a module's parameters (and buffers)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def copy_sharing_frozen(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` whose parameters that are frozen in ``model`` *are* ``model``'s (shared, not
    copied): the EMA tracks and CD/LCM target networks of a LoRA student then add no second base network."""
    dup = copy.deepcopy(model).requires_grad_(False)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            owner, _, leaf = name.rpartition(".")
            setattr(dup.get_submodule(owner) if owner else dup, leaf, p)
    return dup


class EMA:
    """EMA track ``theta_ema <- beta theta_ema + (1 - beta) theta``.

    Args:
        model: the online module (not modified).
        decay: ``beta``; or give ``half_life_steps`` instead (``beta = 0.5 ** (1 / h)``).
        warmup_steps: use ``min(beta, (1 + step) / (10 + step))`` while ``step < warmup_steps``.
        fused: update every tensor in one ``torch._foreach_lerp_`` (``False``: a loop of ``lerp_``, same numbers).

    Parameters of ``model`` that are frozen when the track is created (a LoRA student's base network) are shared
    with the track instead of copied: they never change, so their average is themselves.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float | None = 0.999,
        half_life_steps: float | None = None,
        warmup_steps: int = 0,
        fused: bool = True,
    ):
        if half_life_steps is not None:
            decay = 0.5 ** (1.0 / half_life_steps)
        if decay is None or not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup_steps, self.fused = float(decay), warmup_steps, fused
        self.module = copy_sharing_frozen(model).eval()
        self.num_updates = 0

    def _tracked(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """The (EMA, online) parameter pairs that move: shared frozen parameters (the same tensor) are left out."""
        pairs = [(pe, p) for pe, p in zip(self.module.parameters(), model.parameters()) if pe is not p]
        return [pe for pe, _ in pairs], [p for _, p in pairs]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``theta_ema <- theta_ema + (1 - beta) (theta - theta_ema)``: one fused ``_foreach_lerp_`` over every
        tracked tensor (``fused=False``: one ``lerp_`` per parameter, the same numbers)."""
        beta = self.decay
        if self.num_updates < self.warmup_steps:
            beta = min(beta, (1 + self.num_updates) / (10 + self.num_updates))
        ema, online = self._tracked(model)
        if self.fused and ema:
            src = [p.detach() if p.dtype == pe.dtype else p.detach().to(pe.dtype) for pe, p in zip(ema, online)]
            torch._foreach_lerp_(ema, src, 1.0 - beta)
        else:
            for pe, p in zip(ema, online):
                pe.lerp_(p.detach().to(pe.dtype), 1.0 - beta)
        buffers = [(be, b) for be, b in zip(self.module.buffers(), model.buffers()) if be is not b]
        if self.fused and buffers:
            torch._foreach_copy_([be for be, _ in buffers], [b for _, b in buffers])
        else:
            for be, b in buffers:
                be.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = state["num_updates"]
