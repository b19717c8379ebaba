"""A frozen VAE seen as a codec between images in ``[-1, 1]`` and the scaled latents a latent diffusion model works in.

``z = (E(x) - shift_factor) * scaling_factor`` and ``x = D(z / scaling_factor + shift_factor)``, as diffusers'
pipelines and training scripts scale them (``pipeline_stable_diffusion.py``: ``latents / vae.config.scaling_factor``;
SD3 / Flux add ``shift_factor``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


class LatentCodec(nn.Module):
    """Frozen ``AutoencoderKL`` / ``AutoencoderTiny`` with the config's ``scaling_factor`` and ``shift_factor``.

    Args:
        vae: the diffusers autoencoder.
        sample_posterior: encode to a sample of the posterior instead of its mean (``AutoencoderKL`` only).
    """

    def __init__(self, vae: nn.Module, sample_posterior: bool = False):
        super().__init__()
        name = type(vae).__name__
        if name not in VAE_CLASSES:
            raise TypeError(f"LatentCodec wraps one of {VAE_CLASSES}, got {name}")
        self.vae = vae.eval().requires_grad_(False)
        self.sample_posterior = bool(sample_posterior)
        cfg = vae.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        # diffusers' pipelines: vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scale_factor = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = "vae", **kw) -> LatentCodec:
        """Load the VAE of a pipeline folder or hub id (its class read from the saved config)."""
        import diffusers

        from diffdistill.models.io import local_or_hub

        path = local_or_hub(path)
        try:
            config = diffusers.AutoencoderKL.load_config(str(path), subfolder=subfolder)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"no VAE config under '{path}' (subfolder '{subfolder}'): {e}") from e
        name = config.get("_class_name", "AutoencoderKL")
        if name not in VAE_CLASSES:
            raise ValueError(f"'{path}' holds a {name}; LatentCodec supports {VAE_CLASSES}")
        vae = getattr(diffusers, name).from_pretrained(str(path), subfolder=subfolder)
        return cls(vae, **kw)

    def train(self, mode: bool = True) -> LatentCodec:  # frozen: always in eval mode
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> scaled latents ``[B, C, H/f, W/f]`` (the posterior mean unless
        ``sample_posterior``; ``generator`` seeds the sample)."""
        if images.ndim != 4:
            raise ValueError(f"encode expects images [B, C, H, W], got shape {tuple(images.shape)}")
        x = images.to(self.dtype)
        if type(self.vae).__name__ == "AutoencoderTiny":
            z = self.vae.encode(x).latents
        else:
            posterior = self.vae.encode(x).latent_dist
            z = posterior.sample(generator) if self.sample_posterior else posterior.mean
        return ((z - self.shift_factor) * self.scaling_factor).to(images.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in (about) ``[-1, 1]`` (not clamped)."""
        if latents.ndim != 4:
            raise ValueError(f"decode expects latents [B, C, h, w], got shape {tuple(latents.shape)}")
        z = latents.to(self.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.to(latents.dtype)

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(C, H, W)`` (or with a batch dim) of images -> the shape of their latents."""
        *lead, _, h, w = image_shape
        if h % self.scale_factor or w % self.scale_factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the VAE's scale factor {self.scale_factor}")
        return (*lead, self.latent_channels, h // self.scale_factor, w // self.scale_factor)

    def image_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the images that latents of ``latent_shape`` decode to."""
        *lead, _, h, w = latent_shape
        return (*lead, int(self.vae.config.out_channels), h * self.scale_factor, w * self.scale_factor)
