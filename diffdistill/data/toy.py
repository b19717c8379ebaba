"""Toy data with exact teachers: a Gaussian and an isotropic Gaussian mixture in ``d`` dimensions."""

from __future__ import annotations

import torch
from torch import Tensor

from diffdistill.data.images import Batch
from diffdistill.models.analytic import GaussianDenoiser, GaussianMixtureDenoiser
from diffdistill.models.conditioning import Conditioning


class ToyDataset:
    """Infinite samples of a toy distribution; ``get(idx)`` ignores the index content, uses its length.

    Samples are drawn from a generator seeded by ``(seed, idx[0])`` so that resumed runs replay exactly.
    """

    num_classes: int | None = None

    def __init__(self, size: int = 1_000_000, seed: int = 0):
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def _gen(self, idx: Tensor) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7919 + int(idx[0]))


class GaussianToy(ToyDataset):
    """``N(mean, std^2)`` i.i.d. in each of ``dim`` dimensions (the tests use ``d = 16``; docs/invariants.md §1)."""

    def __init__(self, dim: int = 16, mean: float = 0.3, std: float = 0.8, size: int = 1_000_000, seed: int = 0):
        super().__init__(size, seed)
        self.dim, self.mean, self.std = dim, mean, std
        self.name = f"gaussian-d{dim}-m{mean}-s{std}"

    @property
    def sample_shape(self) -> tuple[int]:
        return (self.dim,)

    def teacher(self, **kw) -> GaussianDenoiser:
        return GaussianDenoiser(torch.full((self.dim,), self.mean), torch.full((self.dim,), self.std), **kw)

    def get(self, idx: Tensor) -> Batch:
        x = self.mean + self.std * torch.randn(len(idx), self.dim, generator=self._gen(idx))
        return Batch(x, Conditioning())

    # ------------------------------------------------------------------ the known distribution (evaluation)
    def true_mean(self) -> Tensor:
        """The exact mean ``mu`` (``[dim]``)."""
        return torch.full((self.dim,), float(self.mean))

    def true_covariance(self) -> Tensor:
        """The exact covariance ``s^2 I`` (``[dim, dim]``)."""
        return torch.eye(self.dim) * float(self.std) ** 2

    def exact_samples(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` independent exact samples ``[n, dim]`` (not the training stream of :meth:`get`)."""
        return self.mean + self.std * torch.randn(n, self.dim, generator=generator)


class GaussianMixtureToy(ToyDataset):
    """``K`` isotropic Gaussians with means on a circle (``dim = 2``) or random (``dim > 2``); labels = component."""

    def __init__(
        self,
        dim: int = 2,
        num_components: int = 8,
        radius: float = 2.0,
        std: float = 0.1,
        size: int = 1_000_000,
        seed: int = 0,
        conditional: bool = False,
    ):
        super().__init__(size, seed)
        if dim == 2:
            ang = torch.arange(num_components) * (2 * torch.pi / num_components)
            means = radius * torch.stack([ang.cos(), ang.sin()], 1)
        else:
            means = radius * torch.randn(num_components, dim, generator=torch.Generator().manual_seed(seed))
        self.dim, self.means, self.std, self.conditional = dim, means, std, conditional
        self.num_classes = num_components if conditional else None
        self.name = f"gmm-d{dim}-k{num_components}-r{radius}-s{std}"

    @property
    def sample_shape(self) -> tuple[int]:
        return (self.dim,)

    def teacher(self, **kw) -> GaussianMixtureDenoiser:
        return GaussianMixtureDenoiser(self.means, self.std, **kw)

    def get(self, idx: Tensor) -> Batch:
        g = self._gen(idx)
        labels = torch.randint(0, len(self.means), (len(idx),), generator=g)
        x = self.means[labels] + self.std * torch.randn(len(idx), self.dim, generator=g)
        return Batch(x, Conditioning(class_labels=labels if self.conditional else None))

    # ------------------------------------------------------------------ the known distribution (evaluation)
    @property
    def component_means(self) -> Tensor:
        """Component means ``mu_k`` (``[K, dim]``)."""
        return self.means

    @property
    def component_stds(self) -> Tensor:
        """Per-dimension standard deviation ``s_k`` of each isotropic component (``[K]``)."""
        return torch.full((len(self.means),), float(self.std))

    @property
    def component_weights(self) -> Tensor:
        """Mixture weights ``pi_k`` (``[K]``; uniform, as :meth:`get` draws components)."""
        return torch.full((len(self.means),), 1.0 / len(self.means))

    def true_mean(self) -> Tensor:
        """The exact mean ``sum_k pi_k mu_k`` (``[dim]``)."""
        return self.component_weights @ self.means

    def true_covariance(self) -> Tensor:
        """The exact covariance ``sum_k pi_k (s_k^2 I + mu_k mu_k^T) - mu mu^T`` (``[dim, dim]``)."""
        w, mu = self.component_weights, self.true_mean()
        second = torch.einsum("k,ki,kj->ij", w, self.means, self.means)
        return second + (w * self.component_stds**2).sum() * torch.eye(self.dim) - torch.outer(mu, mu)

    def exact_samples_and_labels(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` independent exact samples ``[n, dim]`` and their components ``[n]``."""
        labels = torch.multinomial(self.component_weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator)
        return self.means[labels] + self.component_stds[labels, None] * z, labels

    def exact_samples(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` independent exact samples ``[n, dim]`` (not the training stream of :meth:`get`)."""
        return self.exact_samples_and_labels(n, generator)[0]
