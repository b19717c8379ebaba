"""Exact denoisers of Gaussian and Gaussian-mixture data (closed form, no training).

For data ``N(mu, s^2)`` per dimension, ``p_sigma = N(mu, s^2 + sigma^2)`` and the ideal denoiser is
``D*(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)`` (docs/invariants.md §1). For a mixture of isotropic
Gaussians ``sum_k pi_k N(mu_k, s_k^2 I)`` the posterior mean is the responsibility-weighted sum of the
component denoisers. These teachers make every objective testable against ground truth.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffdistill.conventions import append_dims
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.denoiser import Denoiser


class GaussianDenoiser(Denoiser):
    """Exact denoiser of ``N(mu, diag(s^2))`` data.

    Args:
        mean: per-dimension mean ``mu`` (shape = sample shape).
        std: per-dimension standard deviation ``s``.
        trainable: make ``mu`` and ``log s`` parameters (an exact fake score for Gaussian students).
    """

    def __init__(
        self,
        mean: Tensor | list[float],
        std: Tensor | list[float],
        sigma_data: float | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        trainable: bool = False,
    ):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32).expand_as(mean).clone()
        if trainable:
            self.mean = nn.Parameter(mean.clone())
            self.log_std = nn.Parameter(std.log())
        else:
            self.register_buffer("mean", mean)
            self.register_buffer("log_std", std.log())
        self.sigma_data = float(sigma_data if sigma_data is not None else (std**2 + mean**2).mean().sqrt())
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.trainable = bool(trainable)

    def to_config(self) -> dict:
        return {
            "_target_": "diffdistill.models.analytic.GaussianDenoiser",
            "mean": self.mean.detach().cpu().tolist(),
            "std": self.std.detach().cpu().tolist(),
            "sigma_data": self.sigma_data,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "trainable": self.trainable,
        }

    @property
    def std(self) -> Tensor:
        return self.log_std.exp()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        s2 = self.std**2
        sig2 = append_dims(sigma, x.ndim) ** 2
        return self.mean + s2 / (s2 + sig2) * (x - self.mean)

    def trainable_copy(self) -> GaussianDenoiser:
        """A trainable copy (``mu``, ``log s`` as parameters): the exact fake score family for Gaussian students."""
        return GaussianDenoiser(
            self.mean.detach(), self.std.detach(), self.sigma_data, self.sigma_min, self.sigma_max, trainable=True
        )

    def score(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``grad log p_sigma(x) = -(x - mu) / (s^2 + sigma^2)``."""
        return -(x - self.mean) / (self.std**2 + append_dims(sigma, x.ndim) ** 2)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, *self.sample_shape, generator=generator)
        return self.mean + self.std * z


class GaussianMixtureDenoiser(Denoiser):
    """Exact denoiser of a mixture of isotropic Gaussians ``sum_k pi_k N(mu_k, s_k^2 I)`` on flat ``[B, d]`` data.

    With ``conditional`` (default) and ``class_labels`` in the conditioning the denoiser is that of component ``k``
    alone (class-conditional teacher); the null class ``K`` gives the full mixture. ``conditional=False`` is the
    teacher of unlabelled data: no classes (``num_classes = None``), labels are ignored.
    """

    def __init__(
        self,
        means: Tensor | list,
        stds: Tensor | list | float,
        weights: Tensor | list | None = None,
        sigma_data: float | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        conditional: bool = True,
    ):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float32)
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float32).expand(K).clone()
        weights = torch.full((K,), 1.0 / K) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        self.conditional = bool(conditional)
        self.num_classes = K if conditional else None
        second = (self.weights * (stds**2 * means.shape[1] + (means**2).sum(1))).sum() / means.shape[1]
        self.sigma_data = float(sigma_data if sigma_data is not None else second.sqrt())
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def to_config(self) -> dict:
        return {
            "_target_": "diffdistill.models.analytic.GaussianMixtureDenoiser",
            "means": self.means.cpu().tolist(),
            "stds": self.stds.cpu().tolist(),
            "weights": self.weights.cpu().tolist(),
            "sigma_data": self.sigma_data,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "conditional": self.conditional,
        }

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.means.shape[1],)

    def log_responsibilities(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``log w_k(x) = log pi_k + log N(x; mu_k, (s_k^2 + sigma^2) I) - log Z``, shape ``[B, K]``."""
        d = x.shape[1]
        var = self.stds[None] ** 2 + sigma[:, None] ** 2  # [B, K]
        dist2 = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)  # [B, K]
        logp = self.weights.log()[None] - 0.5 * dist2 / var - 0.5 * d * (var.log() + math.log(2 * math.pi))
        return logp - logp.logsumexp(1, keepdim=True)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        var = self.stds[None] ** 2 + sigma[:, None] ** 2  # [B, K]
        shrink = (self.stds[None] ** 2 / var)[..., None]  # [B, K, 1]
        comp = self.means[None] + shrink * (x[:, None, :] - self.means[None])  # [B, K, d]
        w = self.log_responsibilities(x, sigma).exp()
        labels = cond.class_labels if self.conditional else None
        if labels is not None:
            K = len(self.weights)
            onehot = torch.nn.functional.one_hot(labels.long().clamp(max=K - 1), K).to(x)
            is_null = (labels == K)[:, None]
            w = torch.where(is_null, w, onehot)
        return (w[..., None] * comp).sum(1)

    def sample(
        self, n: int, generator: torch.Generator | None = None, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator)
        return self.means[labels] + self.stds[labels, None] * z, labels


class AffineDenoiser(Denoiser):
    """A toy student ``D(x, sigma) = a x / sigma + b`` so that one step from ``sigma z`` gives ``a z + b``.

    The Gaussian toy of docs/invariants.md §1 parametrises the generator as ``x_g = a z + b``; the optimum is
    ``|a| = s``, ``b = mu``. ``a = 0`` is a stationary point of every method, so initialise ``a != 0``.
    """

    def __init__(
        self,
        dim: int = 16,
        a_init: float = 0.5,
        b_init: float = -0.2,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ):
        super().__init__()
        self.a = nn.Parameter(torch.full((dim,), float(a_init)))
        self.b = nn.Parameter(torch.full((dim,), float(b_init)))
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def to_config(self) -> dict:  # the weights (a, b) come from model.safetensors
        return {
            "_target_": "diffdistill.models.analytic.AffineDenoiser",
            "dim": self.a.shape[0],
            "sigma_data": self.sigma_data,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
        }

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        return self.a * x / append_dims(sigma, x.ndim) + self.b
