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
        negative_prompt_embeds: ``[B, L, D]`` embeddings of negative prompts: the unconditional side of CFG
            (default: the model's null prompt, i.e. the empty prompt's embeddings).
        negative_pooled_prompt_embeds: ``[B, D]`` pooled embedding of the negative prompts.
    """

    class_labels: Tensor | None = None
    prompt_embeds: Tensor | None = None
    pooled_prompt_embeds: Tensor | None = None
    micro_conds: Tensor | None = None
    guidance_scale: Tensor | None = None
    negative_prompt_embeds: Tensor | None = None
    negative_pooled_prompt_embeds: Tensor | None = None

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

    def without_negative(self) -> Conditioning:
        """This conditioning with the negative-prompt fields dropped (what a network is fed)."""
        return replace(self, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None)

    def unconditional(
        self, null_class: int | None = None, null_prompt: Conditioning | None = None
    ) -> Conditioning | None:
        """The unconditional side of classifier-free guidance, defined once for labels and prompts alike:
        class labels become ``null_class``; prompt embeddings become the negative prompt's when given, else the
        model's ``null_prompt`` (``[1, L, D]`` / ``[1, D]`` empty-prompt embeddings, broadcast). Micro-conditions
        and the guidance scale are kept. ``None`` when nothing here can be made unconditional (no guidance)."""
        out, changed = self.without_negative(), False
        if self.class_labels is not None and null_class is not None:
            out, changed = replace(out, class_labels=torch.full_like(self.class_labels, null_class)), True
        if self.prompt_embeds is not None:
            neg = self.negative_prompt_embeds
            if neg is None and null_prompt is not None and null_prompt.prompt_embeds is not None:
                neg = null_prompt.prompt_embeds.to(self.prompt_embeds)
            if neg is not None:
                out, changed = replace(out, prompt_embeds=_broadcast(neg, self.prompt_embeds)), True
                if self.pooled_prompt_embeds is not None:
                    pooled = self.negative_pooled_prompt_embeds
                    if pooled is None and self.negative_prompt_embeds is None and null_prompt is not None:
                        pooled = null_prompt.pooled_prompt_embeds
                    if pooled is None:
                        raise ValueError("negative_prompt_embeds given without negative_pooled_prompt_embeds")
                    pooled = _broadcast(pooled.to(self.pooled_prompt_embeds), self.pooled_prompt_embeds)
                    out = replace(out, pooled_prompt_embeds=pooled)
        return out if changed else None


def _broadcast(value: Tensor, like: Tensor) -> Tensor:
    """``value`` (batch 1 or ``B``) expanded to the batch of ``like``, with a clear error on a shape mismatch."""
    if value.shape[1:] != like.shape[1:] or value.shape[0] not in (1, like.shape[0]):
        raise ValueError(
            f"unconditional embeddings of shape {tuple(value.shape)} do not match the prompt embeddings "
            f"{tuple(like.shape)} (batch 1 or {like.shape[0]}, same trailing shape)"
        )
    return value.expand_as(like) if value.shape[0] == 1 else value


def as_conditioning(cond: Conditioning | None) -> Conditioning:
    return Conditioning() if cond is None else cond


@dataclass
class Batch:
    """One training batch: real samples (``None`` for data-free objectives) and their conditioning.

    ``prompts`` are the raw captions of a prompt dataset; the trainer encodes them into ``cond.prompt_embeds``
    with the teacher's text encoder before an objective sees the batch.

    ``scratch`` is per-batch working space an objective may fill in ``generator_loss`` and read back in
    ``critic_loss`` of the same iteration (DMD2 reuses the generated images): it travels with the batch, so
    gradient accumulation and multi-process training pair each critic batch with its own generator output.
    """

    x0: Tensor | None
    cond: Conditioning = field(default_factory=Conditioning)
    prompts: list[str] | None = None
    scratch: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        if self.x0 is not None:
            return self.x0.shape[0]
        return self.cond.batch_size if self.cond.batch_size is not None else len(self.prompts or [])

    def to(self, device) -> Batch:
        return Batch(None if self.x0 is None else self.x0.to(device), self.cond.to(device), self.prompts, self.scratch)
