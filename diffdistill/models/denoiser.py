"""The denoiser role: ``D(x, sigma, cond) -> x0_hat`` in the EDM convention.

``Denoiser`` is the protocol every role implements; ``EDMDenoiser`` wraps a raw network
``F(c_in x, c_noise, cond)`` with EDM preconditioning (Karras et al. 2022, Eq. 7):
``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffdistill.conventions import append_dims, as_sigma, edm_precond
from diffdistill.models.conditioning import Conditioning, as_conditioning


class Denoiser(nn.Module):
    """Base class: subclasses implement :meth:`denoise`; ``forward`` validates and delegates."""

    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    num_classes: int | None = None  # class-conditional models: the null class is ``num_classes``
    has_null_class: bool = True  # False: a class-conditional network trained without a null class (no CFG)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Conditioning | None = None) -> Tensor:
        sigma = as_sigma(sigma, x.shape[0], x.device)
        return self.denoise(x, sigma, as_conditioning(cond))

    def denoise(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        raise NotImplementedError

    def features(self, x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> list[Tensor]:
        """Intermediate activations for discriminator heads (backbones that support it override)."""
        raise NotImplementedError(f"{type(self).__name__} exposes no feature taps")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (without the batch dim)."""
        raise NotImplementedError

    @property
    def null_prompt(self) -> Conditioning | None:
        """The null condition of a prompt-conditioned model (the empty prompt's embeddings, batch 1); ``None`` for
        models without prompts. Adapters of text-to-image networks override it."""
        return None

    def uncond(self, cond: Conditioning) -> Conditioning | None:
        """The unconditional counterpart of ``cond`` for classifier-free guidance (null class, negative or null
        prompt: :meth:`Conditioning.unconditional`), ``None`` when ``cond`` has nothing to guide."""
        null_class = self.num_classes if self.has_null_class else None
        return cond.unconditional(null_class, self.null_prompt)

    def prior_std(self, sigma: float | Tensor) -> float | Tensor:
        """The scale of unit noise ``z`` that starts sampling at ``sigma`` in this model's EDM view: ``sigma`` (the
        EDM prior ``x = sigma z``). Adapters whose native samplers start from unit noise in their own space override
        it (VP: ``x_vp = z``, flow: ``x_rf = z``) so that a stock pipeline, drawing the same ``z``, reproduces the
        student's samples. Takes and returns a float or a ``[B]`` tensor."""
        return sigma


class WrapsDenoiser:
    """Mixin for roles that hold a ``self.denoiser``: expose its noise range, classes and sample shape."""

    sigma_data = property(lambda self: self.denoiser.sigma_data)
    sigma_min = property(lambda self: self.denoiser.sigma_min)
    sigma_max = property(lambda self: self.denoiser.sigma_max)
    num_classes = property(lambda self: self.denoiser.num_classes)
    sample_shape = property(lambda self: self.denoiser.sample_shape)
    has_null_class = property(lambda self: self.denoiser.has_null_class)
    null_prompt = property(lambda self: self.denoiser.null_prompt)

    def uncond(self, cond: Conditioning) -> Conditioning | None:
        return self.denoiser.uncond(cond)

    def prior_std(self, sigma):
        return self.denoiser.prior_std(sigma)


class EDMDenoiser(Denoiser):
    """EDM-preconditioned wrapper around a raw network ``net(x_in, c_noise, cond) -> F``.

    Args:
        net: backbone implementing ``forward(x_in, c_noise, cond)`` and ``sample_shape``.
        sigma_data: data standard deviation (0.5 for pixels in ``[-1, 1]``).
        sigma_min, sigma_max: the noise range the model was trained on.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.net = net
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)
        self.num_classes = getattr(net, "num_classes", None)
        self.has_null_class = bool(getattr(net, "null_class", True))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.net.sample_shape)

    def to_config(self) -> dict:
        from diffdistill.models.io import model_config

        return {
            "_target_": "diffdistill.models.denoiser.EDMDenoiser",
            "net": model_config(self.net),
            "sigma_data": self.sigma_data,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
        }

    def denoise(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        F = self.net(append_dims(c_in, x.ndim) * x, c_noise, cond)
        # (Eq. 7 of Karras et al. 2022) D = c_skip x + c_out F
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * F.to(x.dtype)

    def features(self, x, sigma, cond=None):
        sigma = as_sigma(sigma, x.shape[0], x.device)
        _, _, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        return self.net.features(append_dims(c_in, x.ndim) * x, c_noise, as_conditioning(cond))


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM denoising weight ``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2`` (Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


@torch.no_grad()
def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
