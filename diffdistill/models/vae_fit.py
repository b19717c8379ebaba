"""Training a small KL autoencoder (diffusers ``AutoencoderKL``) from scratch, for a latent teacher made here.

The objective is the reconstruction-plus-KL loss of the latent diffusion autoencoders (Rombach et al. 2022,
arXiv:2112.10752, Sec. 3 and App. G), without the perceptual and adversarial terms:

    L = |x - D(z)|_1 + |x - D(z)|_2^2 + beta KL(q(z|x) || N(0, I)) / (C H W),   z ~ q(z|x)

(per-element means; the KL, summed over the latent, is divided by the number of image elements, so ``beta`` is the
LDM ``kl_weight`` of a loss summed over pixels). After training, the latents are centred per channel inside the
network (:func:`center_latents`: the 1x1 ``quant_conv`` / ``post_quant_conv`` biases absorb the training set's mean,
exactly, because SD pipelines decode ``latents / scaling_factor`` with no shift) and scaled by
``scaling_factor = 1 / std(z)`` (the unit-variance rescaling of LDM Sec. 4.3.2 that gave SD its 0.18215), stored in
the VAE's config, so ``latents = vae.encode(x).latent_dist.mean * scaling_factor`` as diffusers pipelines expect.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

DEFAULT_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,  # 3 blocks: 2 down-samplings, 32x32 -> 8x8
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
}


def build_vae(config: dict[str, Any] | None = None) -> nn.Module:
    """A fresh ``AutoencoderKL`` from ``config`` (default :data:`DEFAULT_VAE_CONFIG`, about 0.68 M parameters)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(config or DEFAULT_VAE_CONFIG))


def vae_loss(vae: nn.Module, x: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None):
    """``(loss, logs)`` of the module docstring's objective for images ``x`` in ``[-1, 1]``."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    x_rec = vae.decode(z).sample
    l1 = (x_rec - x).abs().mean()
    mse = (x_rec - x).square().mean()
    kl = posterior.kl().mean() / x[0].numel()  # KL summed over the latent, per image element
    loss = l1 + mse + kl_weight * kl
    return loss, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def latent_scaling_factor(vae: nn.Module, images: torch.Tensor, batch_size: int = 500) -> float:
    """``1 / std`` of the posterior-mean latents of ``images`` (LDM Sec. 4.3.2's unit-variance rescaling)."""
    total, total_sq, count = 0.0, 0.0, 0
    for i in range(0, len(images), batch_size):
        z = vae.encode(images[i : i + batch_size]).latent_dist.mean.double()
        total += z.sum().item()
        total_sq += z.square().sum().item()
        count += z.numel()
    mean = total / count
    return 1.0 / math.sqrt(total_sq / count - mean**2)


@torch.no_grad()
def latent_channel_mean(vae: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Per-channel mean ``[C]`` of the posterior-mean latents of ``images``."""
    total, count = 0.0, 0
    for i in range(0, len(images), batch_size):
        z = vae.encode(images[i : i + batch_size]).latent_dist.mean.double()
        total = total + z.sum(dim=(0, 2, 3))
        count += z[:, 0].numel()
    return (total / count).float()


@torch.no_grad()
def center_latents(vae: nn.Module, mean: torch.Tensor) -> None:
    """Shift the latent space by ``-mean`` (per channel) in place, leaving reconstructions unchanged:
    ``quant_conv`` outputs the posterior mean ``mu - m``, and ``post_quant_conv(z') = W (z' + m) + b`` becomes
    ``W z' + (b + W m)``."""
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("center_latents needs the 1x1 quant_conv and post_quant_conv (use_quant_conv=True)")
    c = vae.config.latent_channels
    vae.quant_conv.bias[:c] -= mean
    w = vae.post_quant_conv.weight[:, :, 0, 0]  # [C_out, C_in]
    vae.post_quant_conv.bias += w @ mean


def fit_vae(
    images: torch.Tensor,
    config: dict[str, Any] | None = None,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    kl_weight: float = 1e-5,
    seed: int = 0,
    log_every: int = 50,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """Train an ``AutoencoderKL`` on ``images`` (float ``[N, C, H, W]`` in ``[-1, 1]``) and set its ``scaling_factor``.

    Adam with a linear warm-up over the first 2% of steps and a cosine decay to 0; the minibatch order, the posterior
    samples and the initial weights all come from ``seed`` (the global RNG is left untouched). Returns the VAE in eval
    mode, with ``vae.config.scaling_factor = 1 / std`` of its latents over ``images``.
    """
    if images.ndim != 4 or images.dtype != torch.float32:
        raise ValueError(f"images must be float32 [N, C, H, W] in [-1, 1], got {images.dtype} {tuple(images.shape)}")
    if images.min() < -1.0 - 1e-6 or images.max() > 1.0 + 1e-6:
        raise ValueError("images must be scaled to [-1, 1] (x / 127.5 - 1 for uint8)")
    config = dict(config or DEFAULT_VAE_CONFIG)
    if images.shape[1] != config["in_channels"]:
        raise ValueError(f"images have {images.shape[1]} channels, the VAE config expects {config['in_channels']}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = build_vae(config)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    warmup = max(1, steps // 50)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    vae.train()
    order = torch.randperm(len(images), generator=generator)
    pos, start, running = 0, time.time(), {}
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=generator), 0
        x = images[order[pos : pos + batch_size]]
        pos += batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, logs = vae_loss(vae, x, kl_weight, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        for k, v in logs.items():
            running[k] = running.get(k, 0.0) + v
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            msg = " ".join(f"{k} {v / n:.4f}" for k, v in running.items())
            log(f"vae step {step + 1}/{steps} {msg} lr {lr_at(step):.2e} ({time.time() - start:.0f}s)")
            running = {}
    vae.eval()
    center_and_scale(vae, images[:10000], log)
    return vae


def center_and_scale(vae: nn.Module, images: torch.Tensor, log: Callable[[str], None] = print) -> float:
    """Centre the latents of ``images`` per channel (:func:`center_latents`), then set and return
    ``vae.config.scaling_factor = 1 / std``."""
    mean = latent_channel_mean(vae, images)
    center_latents(vae, mean)
    scale = latent_scaling_factor(vae, images)
    vae.register_to_config(scaling_factor=scale)
    log(f"vae latent channel means {[round(v, 4) for v in mean.tolist()]} absorbed; scaling_factor {scale:.5f}")
    return scale
