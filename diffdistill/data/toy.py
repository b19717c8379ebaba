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

    @property
    def sigma_data(self) -> float:
        """``sqrt(E x^2)`` per dimension: the data scale of EDM's preconditioning."""
        return float((self.mean**2 + self.std**2) ** 0.5)

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
    """``K`` isotropic Gaussians ``sum_k pi_k N(mu_k, s_k^2 I)``; labels = component.

    Args:
        dim: dimension ``d``.
        num_components: ``K``.
        radius: the scale of the means: the circle's radius (``layout="circle"``), the spacing of the square grid
            in the first two coordinates (``"grid"``, centred), or the std of Gaussian random means (``"random"``).
        std: ``s_k``: one value or one per component.
        weights: ``pi_k`` (normalised; ``None`` = uniform).
        layout: ``"circle"`` (the first two coordinates), ``"grid"`` or ``"random"``; ``None`` = circle in 2-D,
            random otherwise.
        conditional: class-conditional data (labels in the conditioning, a class-conditional exact teacher).
    """

    def __init__(
        self,
        dim: int = 2,
        num_components: int = 8,
        radius: float = 2.0,
        std: float | list[float] = 0.1,
        size: int = 1_000_000,
        seed: int = 0,
        conditional: bool = False,
        weights: list[float] | None = None,
        layout: str | None = None,
    ):
        super().__init__(size, seed)
        layout = layout or ("circle" if dim == 2 else "random")
        if layout not in ("circle", "grid", "random"):
            raise ValueError(f"data.layout must be circle, grid or random, got {layout!r}")
        if layout != "random" and dim < 2:
            raise ValueError(f"data.layout={layout} needs dim >= 2, got {dim}")
        K = int(num_components)
        means = torch.zeros(K, dim)
        if layout == "circle":
            ang = torch.arange(K) * (2 * torch.pi / K)
            means[:, :2] = radius * torch.stack([ang.cos(), ang.sin()], 1)
        elif layout == "grid":
            side = int(torch.tensor(float(K)).sqrt().ceil())
            ij = torch.stack([torch.arange(K) % side, torch.arange(K) // side], 1).float()
            means[:, :2] = radius * (ij - ij.mean(0))
        else:
            means = radius * torch.randn(K, dim, generator=torch.Generator().manual_seed(seed))
        stds = torch.as_tensor(std, dtype=torch.float32).expand(K).clone()
        w = torch.full((K,), 1.0 / K) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (K,) or not bool((w > 0).all()):
            raise ValueError(f"data.weights must be {K} positive numbers, got {weights!r}")
        if not bool((stds > 0).all()):
            raise ValueError(f"data.std must be > 0, got {std!r}")
        self.dim, self.means, self.stds, self.weights = dim, means, stds, w / w.sum()
        self.std = float(stds[0]) if bool((stds == stds[0]).all()) else stds
        self.conditional, self.layout = conditional, layout
        self.num_classes = K if conditional else None
        shape = "" if layout == ("circle" if dim == 2 else "random") else f"-{layout}"
        width = f"s{std}" if not isinstance(std, (list, tuple)) else "s" + "_".join(f"{v:g}" for v in std)
        self.name = f"gmm-d{dim}-k{K}-r{radius}-{width}{shape}" + ("-w" if weights is not None else "")

    @property
    def sigma_data(self) -> float:
        """``sqrt(E|x|^2 / d)``: the data scale of EDM's preconditioning (Karras et al. 2022, App. B.6)."""
        second = (self.weights * (self.stds**2 * self.dim + (self.means**2).sum(1))).sum() / self.dim
        return float(second.sqrt())

    @property
    def sample_shape(self) -> tuple[int]:
        return (self.dim,)

    def teacher(self, **kw) -> GaussianMixtureDenoiser:
        kw.setdefault("conditional", self.conditional)
        return GaussianMixtureDenoiser(self.means, self.stds, self.weights, **kw)

    def get(self, idx: Tensor) -> Batch:
        g = self._gen(idx)
        if self.uniform:  # the stream of earlier versions, kept so that saved runs resume identically
            labels = torch.randint(0, len(self.means), (len(idx),), generator=g)
        else:
            labels = torch.multinomial(self.weights, len(idx), replacement=True, generator=g)
        x = self.means[labels] + self.stds[labels, None] * torch.randn(len(idx), self.dim, generator=g)
        return Batch(x, Conditioning(class_labels=labels if self.conditional else None))

    # ------------------------------------------------------------------ the known distribution (evaluation)
    @property
    def component_means(self) -> Tensor:
        """Component means ``mu_k`` (``[K, dim]``)."""
        return self.means

    @property
    def uniform(self) -> bool:
        return bool(torch.allclose(self.weights, torch.full_like(self.weights, 1.0 / len(self.weights))))

    @property
    def component_stds(self) -> Tensor:
        """Per-dimension standard deviation ``s_k`` of each isotropic component (``[K]``)."""
        return self.stds

    @property
    def component_weights(self) -> Tensor:
        """Mixture weights ``pi_k`` (``[K]``)."""
        return self.weights

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
