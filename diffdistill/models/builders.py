"""Factories that build denoisers from plain config (what ``config.json`` of a saved model records)."""

from __future__ import annotations

from typing import Any

from diffdistill.models.backbones import MLPBackbone, UNetBackbone
from diffdistill.models.denoiser import EDMDenoiser


def edm_unet(
    unet_config: dict[str, Any],
    num_classes: int | None = None,
    sigma_data: float = 0.5,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    c_noise_scale: float = 1000.0,
    guidance_embedding: bool = False,
) -> EDMDenoiser:
    """An EDM-preconditioned diffusers ``UNet2DModel`` (class-conditional with a null class if ``num_classes``;
    ``guidance_embedding`` feeds ``cond.guidance_scale`` to guidance-conditioned students such as LCM)."""
    net = UNetBackbone(dict(unet_config), num_classes, c_noise_scale, guidance_embedding)
    return EDMDenoiser(net, sigma_data, sigma_min, sigma_max)


def edm_unet_pretrained(
    path: str,
    subfolder: str | None = None,
    num_classes: int | None = None,
    null_class: bool = False,
    sigma_data: float = 0.5,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    c_noise_scale: float = 1000.0,
) -> EDMDenoiser:
    """An EDM teacher stored as a diffusers ``UNet2DModel`` folder (or hub id) whose raw network takes
    ``c_noise_scale * ln(sigma) / 4`` as its timestep: openai/consistency_models' EDM teachers (250 ln sigma)
    after diffusers' ``convert_consistency_to_diffusers.py``."""
    net = UNetBackbone.from_pretrained(path, subfolder, num_classes, null_class, c_noise_scale)
    return EDMDenoiser(net, sigma_data, sigma_min, sigma_max)


def edm_mlp(
    dim: int = 2,
    hidden: int = 128,
    depth: int = 3,
    num_classes: int | None = None,
    sigma_data: float = 0.5,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    guidance_embedding: bool = False,
    fourier_scale: float = 16.0,
) -> EDMDenoiser:
    """An EDM-preconditioned residual MLP for low-dimensional toys (``fourier_scale``: see ``MLPBackbone``)."""
    net = MLPBackbone(dim, hidden, depth, num_classes, guidance_embedding, fourier_scale)
    return EDMDenoiser(net, sigma_data, sigma_min, sigma_max)
