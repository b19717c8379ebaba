"""Raw networks ``F(x_in, c_noise, cond)`` that ``EDMDenoiser`` preconditions.

* :class:`UNetBackbone`: a diffusers ``UNet2DModel`` (optionally class-conditional with a null class).
* :class:`MLPBackbone`: a small MLP for 2-D / low-dimensional toys.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from diffdistill.models.conditioning import Conditioning


class UNetBackbone(nn.Module):
    """diffusers ``UNet2DModel`` fed ``c_noise`` as its timestep.

    Args:
        unet_config: keyword arguments of ``UNet2DModel`` (``sample_size``, ``block_out_channels``...).
        num_classes: number of real classes; the model gets ``num_classes + 1`` embeddings, the last
            being the null class used for classifier-free guidance. ``None`` = unconditional.
        c_noise_scale: the UNet's timestep is ``c_noise_scale * c_noise``; 1000 turns EDM's
            ``ln(sigma)/4`` into ``250 ln(sigma)``, the range its sinusoidal embedding resolves well
            (the convention of openai/consistency_models).
    """

    def __init__(self, unet_config: dict[str, Any], num_classes: int | None = None, c_noise_scale: float = 1000.0) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        cfg = dict(unet_config)
        if num_classes is not None:
            cfg["num_class_embeds"] = num_classes + 1
        self.unet = UNet2DModel(**cfg)
        self.num_classes = num_classes
        self.unet_config = dict(unet_config)
        self.c_noise_scale = float(c_noise_scale)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        s = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (c.in_channels, s, s)

    def _labels(self, cond: Conditioning, batch: int, device) -> Tensor | None:
        if self.num_classes is None:
            return None
        if cond.class_labels is None:  # unconditional call on a conditional model: null class
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return cond.class_labels.long()

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: Conditioning) -> Tensor:
        labels = self._labels(cond, x_in.shape[0], x_in.device)
        return self.unet(x_in, self.c_noise_scale * c_noise, class_labels=labels).sample

    def features(self, x_in: Tensor, c_noise: Tensor, cond: Conditioning) -> list[Tensor]:
        """Output of each down block and of the mid block (discriminator taps)."""
        taps: list[Tensor] = []
        hooks = [b.register_forward_hook(lambda m, i, o: taps.append(o[0] if isinstance(o, tuple) else o))
                 for b in [*self.unet.down_blocks, self.unet.mid_block]]
        try:
            self.forward(x_in, c_noise, cond)
        finally:
            for h in hooks:
                h.remove()
        return taps


class FourierEmbedding(nn.Module):
    """Random Fourier features of ``c_noise`` (EDM's ``FourierEmbedding``)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, c: Tensor) -> Tensor:
        h = 2 * math.pi * c[:, None].float() * self.freqs[None]
        return torch.cat([h.cos(), h.sin()], dim=1)


class MLPBackbone(nn.Module):
    """A residual MLP on flat ``[B, dim]`` samples, conditioned on ``c_noise`` (and optional classes)."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, num_classes: int | None = None):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.emb = FourierEmbedding(hidden)
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes is not None else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    @property
    def sample_shape(self) -> tuple[int]:
        return (self.dim,)

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: Conditioning) -> Tensor:
        e = self.emb(c_noise)
        if self.class_emb is not None:
            labels = cond.class_labels
            if labels is None:
                labels = torch.full((x_in.shape[0],), self.num_classes, dtype=torch.long, device=x_in.device)
            e = e + self.class_emb(labels.long())
        h = self.inp(x_in) + e
        for blk in self.blocks:
            h = h + blk(h + e)
        return self.out(h)

    def features(self, x_in, c_noise, cond):
        e = self.emb(c_noise)
        h = self.inp(x_in) + e
        taps = []
        for blk in self.blocks:
            h = h + blk(h + e)
            taps.append(h)
        return taps
