"""A network fitted to an exact teacher: what "copy the teacher's weights" means when the teacher has none.

Real students, fake scores and EMA targets start as copies of the teacher's network. An analytic teacher
(``backbone=analytic``: the closed-form denoiser of a toy distribution, :mod:`diffdistill.models.analytic`) has no
weights, so ``student/denoiser=toy_mlp_fitted`` (and ``fake_score/denoiser=toy_mlp_fitted``) build a network and
regress it onto the exact denoiser first:

    x0 ~ p_data (the teacher's exact sampler),  ln sigma ~ N(P_mean + ln(sigma_data / 0.5), P_std^2),
    L = lambda(sigma) || D_theta(x0 + sigma eps, sigma) - D*(x0 + sigma eps, sigma) ||^2       (Karras et al. 2022,
        Eq. 2 with the exact posterior mean D* as the target; lambda of Table 1)

This is an initialisation, not a training run: a few thousand small steps on one fixed seed (deterministic, so the
student and the fake score start from the same weights, as both copy one teacher in a real run), memoised per
process by the network's config and the fit's settings.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import torch
from torch import nn

from diffdistill.conventions import noise_scale
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.denoiser import Denoiser, edm_loss_weight

_CACHE: dict[str, dict[str, torch.Tensor]] = {}


def _exact_samples(teacher_den: nn.Module, n: int, generator: torch.Generator) -> tuple[torch.Tensor, Any]:
    out = teacher_den.sample(n, generator=generator)
    return out if isinstance(out, tuple) else (out, None)


def fit_to_teacher(
    network: Denoiser,
    teacher: nn.Module,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 1e-3,
    P_mean: float = -1.2,
    P_std: float = 2.0,
    label_dropout: float = 0.1,
    seed: int = 0,
) -> Denoiser:
    """``network`` regressed onto the exact denoiser of ``teacher`` (see the module docstring); returns it, trainable.
    A teacher with weights of its own (a trained network) is copied instead, as any student copies its teacher.

    Args:
        network: the denoiser to fit (e.g. :func:`diffdistill.models.builders.edm_mlp`).
        teacher: a :class:`~diffdistill.models.teacher.Teacher` (or denoiser) whose denoiser has ``sample(n)``.
        steps, batch_size, lr: Adam with a cosine decay to 0.
        P_mean, P_std: the log-normal sigma density, for ``sigma_data = 0.5`` (shifted by ``ln(sigma_data / 0.5)``);
            wider than EDM's 1.2 so that the network is also right at the one-step input's large sigma.
        label_dropout: fraction of null-class targets for a class-conditional teacher.
        seed: the fit's own RNG (the global RNG is left untouched).
    """
    den = getattr(teacher, "denoiser", teacher)
    if not callable(getattr(den, "sample", None)) and any(True for _ in den.parameters()):
        from diffdistill.models.generator import trainable_copy

        return trainable_copy(teacher)  # a trained teacher (e.g. of diffdistill-teacher): its weights, as usual
    if not callable(getattr(den, "sample", None)):
        raise ValueError(
            f"fitting a network to the teacher needs an exact sampler: {type(den).__name__} has no sample(n); "
            "use an analytic teacher (backbone=analytic) or give the role a trained network"
        )
    if len(tuple(den.sample_shape)) != 1:
        raise ValueError(f"fit_to_teacher is for flat [B, d] toy data, the teacher's samples are {den.sample_shape}")
    if steps < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"fit needs steps >= 0, batch_size >= 1, lr > 0, got {steps}, {batch_size}, {lr}")
    from diffdistill.models.io import model_config

    key = json.dumps(
        [model_config(network), model_config(den), steps, batch_size, lr, P_mean, P_std, label_dropout, seed],
        sort_keys=True,
        default=str,
    )
    if key in _CACHE:
        network.load_state_dict(_CACHE[key])
        return network.train()
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        shift = math.log(noise_scale(network.sigma_data))
        opt = torch.optim.Adam(network.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        K = getattr(den, "num_classes", None)
        network.train()
        for _ in range(int(steps)):
            x0, labels = _exact_samples(den, batch_size, gen)
            sigma = (P_mean + shift + P_std * torch.randn(batch_size, generator=gen)).exp()
            x = x0 + sigma[:, None] * torch.randn(x0.shape, generator=gen)
            cond = Conditioning()
            if K and labels is not None:
                drop = torch.rand(batch_size, generator=gen) < label_dropout
                cond = Conditioning(class_labels=torch.where(drop, torch.full_like(labels, K), labels))
            with torch.no_grad():
                target = den(x, sigma, cond)
            err = ((network(x, sigma, cond) - target) ** 2).mean(1)
            # (Karras et al. 2022, Eq. 2 / Table 1) lambda(sigma) ||D_theta - D*||^2
            loss = (edm_loss_weight(sigma, network.sigma_data) * err).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    _CACHE[key] = copy.deepcopy(network.state_dict())
    return network.train()
