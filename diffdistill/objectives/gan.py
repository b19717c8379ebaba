"""GAN losses and the R1 penalty, as pure functions on discriminator logits (``diffdistill/models/discriminator.py``).

Logits are ``[B, heads]`` (one per head and sample) or ``[B]``; every loss is averaged over heads and returned per
sample ``[B]``, for the trainer to reduce.

* ``ns``: the non-saturating (softplus / BCE-with-logits) loss of Goodfellow et al. 2014 as DMD2 uses it
  (arXiv:2405.14867, §4.2): discriminator ``softplus(l_fake) + softplus(-l_real)``, generator ``softplus(-l_fake)``.
* ``hinge``: Lim & Ye 2017 as ADD uses it (arXiv:2311.17042, §3.2): discriminator
  ``max(0, 1 - l_real) + max(0, 1 + l_fake)``, generator ``-l_fake``.
* R1 (Mescheder et al. 2018, arXiv:1801.04406, Eq. 9): ``||grad_x D(x_real)||^2``; ``exact`` by double
  backpropagation, ``approx`` by the finite-noise form ``(D(x + s n) - D(x))^2 / s^2`` with ``n ~ N(0, I)``
  (LADD-style, without a second backward), whose expectation tends to the exact value as ``s -> 0``
  (``E[(g . n)^2] = ||g||^2``). The ``1 / s^2`` makes the two forms interchangeable under one weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

GAN_LOSSES = ("ns", "hinge")
R1_KINDS = ("exact", "approx")


def _per_sample(logits: Tensor) -> Tensor:
    return logits.float().reshape(logits.shape[0], -1).mean(1)


def check_gan_loss(kind: str, key: str = "gan_loss") -> str:
    if kind not in GAN_LOSSES:
        raise ValueError(f"{key} must be one of {GAN_LOSSES}, got {kind!r}")
    return kind


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: str = "ns") -> Tensor:
    """Per-sample discriminator loss (``2 ln 2`` for ``ns`` and ``2`` for ``hinge`` at zero logits)."""
    check_gan_loss(kind)
    if kind == "ns":
        # (Goodfellow et al. 2014, Eq. 1, as BCE with logits) real -> 1, fake -> 0
        return _per_sample(F.softplus(-logits_real)) + _per_sample(F.softplus(logits_fake))
    # (Lim & Ye 2017, Eq. 8) hinge
    return _per_sample(F.relu(1.0 - logits_real)) + _per_sample(F.relu(1.0 + logits_fake))


def generator_loss(logits_fake: Tensor, kind: str = "ns") -> Tensor:
    """Per-sample generator loss (``ns``: non-saturating ``softplus(-l)``; ``hinge``: ``-l``)."""
    check_gan_loss(kind)
    if kind == "ns":
        # (Goodfellow et al. 2014, §3, non-saturating generator loss)
        return _per_sample(F.softplus(-logits_fake))
    # (Lim & Ye 2017, Eq. 9)
    return _per_sample(-logits_fake)


def r1_penalty(
    discriminator: Callable[[Tensor], Tensor],
    x: Tensor,
    kind: str = "exact",
    noise_std: float = 0.1,
    noise: Tensor | None = None,
) -> Tensor:
    """Per-sample R1 ``||grad_x D(x)||^2`` of ``D = mean over heads of discriminator(x)`` at real inputs ``x``.

    ``exact`` differentiates through ``discriminator`` with a graph (so the penalty itself trains it);
    ``approx`` is ``(D(x + noise_std n) - D(x))^2 / noise_std^2``.
    """
    if kind not in R1_KINDS:
        raise ValueError(f"r1_kind must be one of {R1_KINDS}, got {kind!r}")
    if kind == "exact":
        x = x.detach().clone().requires_grad_(True)
        # the math attention kernel: the fused CPU/flash kernels have no double backward
        with sdpa_kernel(SDPBackend.MATH):
            d = _per_sample(discriminator(x))
        (grad,) = torch.autograd.grad(d.sum(), x, create_graph=True)
        # (Mescheder et al. 2018, Eq. 9) R1 = ||grad_x D(x)||^2
        return grad.flatten(1).pow(2).sum(1)
    if not noise_std > 0:
        raise ValueError(f"r1_noise_std must be > 0, got {noise_std}")
    n = torch.randn_like(x) if noise is None else noise
    d = _per_sample(discriminator(x.detach()))
    d_noised = _per_sample(discriminator(x.detach() + noise_std * n))
    # finite-noise R1: (D(x + s n) - D(x))^2 / s^2, an unbiased-as-s->0 estimate of ||grad_x D||^2
    return (d_noised - d).pow(2) / noise_std**2
