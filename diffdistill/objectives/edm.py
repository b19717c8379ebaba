"""EDM denoising score matching (Karras et al. 2022, arXiv:2206.00364): how teachers are trained.

    ln sigma ~ N(P_mean, P_std^2)                                   (Table 1, "Training": P_mean -1.2, P_std 1.2)
    L = E[lambda(sigma) ||D_theta(x0 + sigma eps, sigma, c) - x0||^2]   (Eq. 8; here averaged over elements)
    lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2         (Table 1, "Loss weighting")

For classifier-free guidance the class label is replaced by the null class with probability ``label_dropout``
(Ho & Salimans 2022, arXiv:2207.12598, Alg. 1). The trained denoiser is the ``generator`` role; there is no teacher
in the loss. ``diffdistill-teacher`` (``diffdistill/cli/teacher.py``) runs this objective through the one trainer
and saves the EMA denoiser as a teacher model folder.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch
from torch import nn

from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.objectives.base import LossOutput, Objective, Paper, PassCount, register_objective
from diffdistill.objectives.common import data_noise_scale, denoising_score_matching_loss
from diffdistill.schedules.karras import LogNormalSigma

log = logging.getLogger(__name__)


@register_objective
class EDMDenoising(Objective):
    """Train a denoiser with the EDM loss (Karras et al. 2022), optionally with label dropout for CFG.

    Args:
        generator: the denoiser being trained, as a :class:`~diffdistill.models.generator.Generator` (its
            ``.denoiser``); from scratch when the run's ``student.denoiser`` builds a fresh network, else a copy of
            the teacher (continued training).
        teacher: unused by the loss (accepted so the trainer can pass every role; it only appears in sample grids).
        P_mean, P_std: the log-normal training density of sigma (-1.2, 1.2).
        match_sigma_data: ``P_mean`` is the paper's for ``sigma_data = 0.5``; use ``P_mean + ln(sigma_data / 0.5)``
            for the network's ``sigma_data`` (:func:`~diffdistill.conventions.noise_scale`; exact at 0.5).
        weighting: ``"edm"`` = ``lambda(sigma)`` above (the paper) or ``"none"`` (``lambda = 1``).
        label_dropout: probability of replacing a sample's condition by the unconditional one (0 = off; the paper
            trains without guidance; 0.1 is the usual CFG setting): a class label by the null class
            ``generator.num_classes``, a prompt by the network's null prompt (the empty prompt's embeddings).

    Sigmas are clamped to the network's range ``[sigma_min, sigma_max]`` (a DDPM-family network is defined only on its
    schedule's range; for EDM networks, ``[0.002, 80]``, the clamp is almost never active).
    """

    name = "edm"
    paper = Paper(
        "Elucidating the Design Space of Diffusion-Based Generative Models",
        "2206.00364",
        "Karras, Aittala, Aila, Laine",
        2022,
    )
    roles = ("generator",)
    requires_real_data = True
    # the student is a denoiser: sample grids run Heun over the Karras grid, as for the teacher (trainer.py)
    student_sampler = "heun"

    def __init__(
        self,
        generator: nn.Module,
        teacher: nn.Module | None = None,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        weighting: str = "edm",
        label_dropout: float = 0.0,
        match_sigma_data: bool = True,
    ):
        if weighting not in ("edm", "none"):
            raise ValueError(f"unknown weighting '{weighting}' (use 'edm' or 'none')")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        if label_dropout > 0 and not generator.num_classes and getattr(generator, "null_prompt", None) is None:
            # the Fashion-MNIST recipe's 0.1 under an unconditional network (e.g. data=toy_gmm): nothing to drop
            log.warning("objective.label_dropout=%g ignored: the denoiser is unconditional", label_dropout)
            label_dropout = 0.0
        if label_dropout > 0 and generator.num_classes and not getattr(generator, "has_null_class", True):
            raise ValueError("label_dropout needs a denoiser with a null-class embedding; this one has none")
        self.generator, self.teacher = generator, teacher
        # the density of the network being trained: P_mean + ln(sigma_data / 0.5) (exact at 0.5)
        shift = math.log(data_noise_scale(None, generator, match_sigma_data))
        self.sigma_sampler = LogNormalSigma(float(P_mean) + shift, float(P_std))
        self.weighting = weighting
        self.label_dropout = float(label_dropout)

    def drop_labels(self, cond: Conditioning) -> Conditioning:
        """Each sample's condition replaced by its unconditional counterpart (null class, null prompt:
        ``Denoiser.uncond``) with probability ``label_dropout``."""
        if self.label_dropout <= 0:
            return cond
        uncond = self.generator.uncond(cond)
        if uncond is None:
            return cond
        n = cond.batch_size
        drop = torch.rand(n, device=next(iter(cond._tensors().values())).device) < self.label_dropout
        cond = cond.without_negative()
        mixed = {}
        for k, v in cond._tensors().items():
            u = getattr(uncond, k)
            mixed[k] = torch.where(drop.view(-1, *([1] * (v.ndim - 1))), u.to(v.dtype), v) if u is not None else v
        return replace(cond, **mixed)

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x0 = batch.x0
        if x0 is None:
            raise ValueError("EDM denoising needs real samples (Batch.x0)")
        cond = self.drop_labels(batch.cond)
        den = self.generator.denoiser
        sigma = self.sigma_sampler(x0.shape[0], x0.device).clamp(den.sigma_min, den.sigma_max)
        loss = denoising_score_matching_loss(self.generator.denoiser, x0, sigma, cond, self.weighting)
        return LossOutput(loss, {"sigma_median": float(sigma.median())})

    def pass_count(self) -> PassCount:
        return PassCount(forward_grad=1.0, backward=1.0)
