"""The conditioning passed to every denoiser (a dataclass, not keyword soup) and the training batch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """What a denoiser is conditioned on. Every field is optional and batched along dim 0.

    Attributes:
        class_labels: ``[B]`` int64 class indices; the null class (for CFG) is ``num_classes``.
        prompt_embeds: ``[B, L, D]`` text-encoder hidden states.
        pooled_prompt_embeds: ``[B, D]`` pooled text embedding (SDXL / SD3).
        micro_conds: ``[B, K]`` extra conditions (e.g. SDXL time ids).
        guidance_scale: ``[B]`` guidance scale fed to guidance-embedded students (LCM, Flux).
    """

    class_labels: Tensor | None = None
    prompt_embeds: Tensor | None = None
    pooled_prompt_embeds: Tensor | None = None
    micro_conds: Tensor | None = None
    guidance_scale: Tensor | None = None

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def batch_size(self) -> int | None:
        t = self._tensors()
        return next(iter(t.values())).shape[0] if t else None

    def map(self, fn) -> Conditioning:
        """Apply ``fn`` to every tensor field."""
        return replace(self, **{k: fn(v) for k, v in self._tensors().items()})

    def to(self, device: torch.device | str) -> Conditioning:
        return self.map(lambda v: v.to(device))

    def __getitem__(self, idx) -> Conditioning:
        return self.map(lambda v: v[idx])

    def repeat(self, n: int) -> Conditioning:
        return self.map(lambda v: v.repeat(n, *([1] * (v.ndim - 1))))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate conditionings along the batch (all must set the same fields)."""
        keys = items[0]._tensors().keys()
        for c in items[1:]:
            if c._tensors().keys() != keys:
                raise ValueError("cannot concatenate conditionings with different fields")
        return Conditioning(**{k: torch.cat([getattr(c, k) for c in items]) for k in keys})

    def with_null_class(self, null_class: int) -> Conditioning:
        """The unconditional counterpart used by classifier-free guidance."""
        if self.class_labels is None:
            return self
        return replace(self, class_labels=torch.full_like(self.class_labels, null_class))


def as_conditioning(cond: Conditioning | None) -> Conditioning:
    return Conditioning() if cond is None else cond


@dataclass
class Batch:
    """One training batch: real samples (``None`` for data-free objectives) and their conditioning.

    ``scratch`` is per-batch working space an objective may fill in ``generator_loss`` and read back in
    ``critic_loss`` of the same iteration (DMD2 reuses the generated images): it travels with the batch, so
    gradient accumulation and multi-process training pair each critic batch with its own generator output.
    """

    x0: Tensor | None
    cond: Conditioning = field(default_factory=Conditioning)
    scratch: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.x0.shape[0] if self.x0 is not None else self.cond.batch_size

    def to(self, device) -> Batch:
        return Batch(None if self.x0 is None else self.x0.to(device), self.cond.to(device), self.scratch)
