"""Generation for evaluation with one seed per sample.

Sample ``i`` draws all its randomness (the initial noise, then any re-noising of a few-step sampler) from
``torch.Generator().manual_seed(seed + i)`` on the CPU, so an image depends only on ``(model, seed, i)``:
never on the batch size, the batch it lands in, or the number of devices (a device handles any slice
``start:stop`` of the index range).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffdistill.models.conditioning import Conditioning
from diffdistill.utils.images import to_uint8

CondFn = Callable[[Tensor], Conditioning]
Decode = Callable[[Tensor], Tensor]  # latents -> images in [-1, 1] (a latent model's VAE decoder)


def per_sample_noise(
    indices: Tensor | range, shape: tuple[int, ...], seed: int = 0, num_draws: int = 1
) -> list[Tensor]:
    """``num_draws`` noise tensors ``[B, *shape]``; row ``b`` of draw ``k`` is the ``k``-th ``randn(shape)`` of
    ``torch.Generator().manual_seed(seed + indices[b])``."""
    draws: list[list[Tensor]] = [[] for _ in range(num_draws)]
    for i in indices:
        g = torch.Generator().manual_seed(int(seed) + int(i))
        for k in range(num_draws):
            draws[k].append(torch.randn(shape, generator=g))
    return [torch.stack(d) for d in draws]


def class_conditioning(num_classes: int) -> CondFn:
    """Class labels ``i % num_classes`` (balanced classes whatever the number of images)."""
    return lambda idx: Conditioning(class_labels=(idx % num_classes).long())


def prompt_conditioning(prompts: Sequence[str], encoder: Any) -> CondFn:
    """Sample ``i`` conditioned on ``prompts[i % len(prompts)]``, embedded by ``encoder.encode(list[str]) ->
    Conditioning`` (a text-to-image teacher's :class:`~diffdistill.models.text.PromptEncoder`): per-sample, so the
    conditioning of an image does not depend on the batch it lands in."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompt conditioning needs at least one prompt")

    def cond_fn(idx: Tensor) -> Conditioning:
        enc = encoder.encode([prompts[int(i) % len(prompts)] for i in idx])
        return Conditioning(prompt_embeds=enc.prompt_embeds, pooled_prompt_embeds=enc.pooled_prompt_embeds)

    return cond_fn


@dataclass
class SamplerSpec:
    """How a model is sampled: ``kind`` is ``one_step``, ``multistep`` (consistency) or ``heun`` (teacher)."""

    kind: str
    sigmas: list[float]
    steps: int

    def protocol(self) -> dict[str, Any]:
        return {"sampler": self.kind, "sampler_steps": self.steps, "sigmas": [round(s, 6) for s in self.sigmas]}


def sampler_spec(model: nn.Module, steps: int | None = None, sigmas: list[float] | None = None) -> SamplerSpec:
    """Decide how to sample ``model``.

    * a :class:`~diffdistill.models.Teacher` (or any bare denoiser): EDM Heun (Karras et al. 2022, Alg. 1) on
      ``karras_sigmas(steps, sigma_min, sigma_max, append_zero=True)`` (default 18 steps = 35 evaluations);
    * a :class:`~diffdistill.models.Generator`: one step at ``sigma_init`` or consistency multistep sampling on
      ``sigmas`` (default ``gen.sampling_sigmas``); ``steps`` picks the first ``steps`` of that list.
    """
    from diffdistill.models.generator import Generator
    from diffdistill.schedules.karras import karras_sigmas

    if isinstance(model, Generator) or hasattr(model, "sampling_sigmas"):
        s = [float(v) for v in (sigmas if sigmas is not None else model.sampling_sigmas)]
        if steps is not None and sigmas is None:
            if steps > len(s):
                raise ValueError(
                    f"the generator has {len(s)} sampling sigmas {s}; cannot sample {steps} steps "
                    "(give eval sigmas explicitly)"
                )
            s = s[:steps]
        return SamplerSpec("one_step" if len(s) == 1 else "multistep", s, len(s))
    n = 18 if steps is None else int(steps)
    if sigmas is not None:
        grid = [float(v) for v in sigmas]
    else:
        grid = karras_sigmas(n, float(model.sigma_min), float(model.sigma_max), append_zero=True).tolist()
    return SamplerSpec("heun", grid, len(grid) - 1)


@torch.no_grad()
def sample_batch(
    model: nn.Module,
    indices: Tensor,
    spec: SamplerSpec,
    seed: int = 0,
    cond_fn: CondFn | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Images ``[B, C, H, W]`` in ``[-1, 1]`` (float) for the sample indices ``indices``."""
    from diffdistill.sampling import heun_sample, multistep_sample

    shape = tuple(model.sample_shape)
    num_draws = len(spec.sigmas) if spec.kind == "multistep" else 1  # z, then one re-noising per extra step
    draws = per_sample_noise(indices, shape, seed, num_draws=num_draws)
    z = draws[0].to(device)
    cond = cond_fn(indices).to(device) if cond_fn is not None else None
    if spec.kind == "one_step":
        return model(z, cond, sigma=spec.sigmas[0])
    if spec.kind == "multistep":
        noise = [d.to(device) for d in draws[1:]]
        floor = getattr(model, "renoise_floor", 0.0)
        prior = model.prior_std(float(spec.sigmas[0])) if hasattr(model, "prior_std") else None
        return multistep_sample(model.denoise, z, spec.sigmas, cond, noise=noise, sigma_min=floor, prior_std=prior)
    sigmas = torch.tensor(spec.sigmas)
    prior = model.prior_std(float(spec.sigmas[0])) if hasattr(model, "prior_std") else float(spec.sigmas[0])
    return heun_sample(model, prior * z, sigmas, cond)


def iter_generate(
    model: nn.Module,
    num_images: int,
    seed: int = 0,
    batch_size: int = 64,
    start: int = 0,
    spec: SamplerSpec | None = None,
    cond_fn: CondFn | None = None,
    device: str | torch.device = "cpu",
    decode: Decode | None = None,
) -> Iterator[Tensor]:
    """Yield uint8 image batches ``[b, C, H, W]`` for indices ``start .. start + num_images - 1``; a latent model's
    samples are turned into images by ``decode`` first.

    The model is put in eval mode for the duration and restored afterwards (safe inside a training loop).
    """
    spec = spec or sampler_spec(model)
    was_training = model.training
    model.eval()
    try:
        for lo in range(start, start + num_images, batch_size):
            idx = torch.arange(lo, min(lo + batch_size, start + num_images))
            x = sample_batch(model, idx, spec, seed, cond_fn, device)
            if decode is not None:
                with torch.no_grad():
                    x = decode(x)
            yield to_uint8(x.float()).cpu()
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    num_images: int,
    seed: int = 0,
    batch_size: int = 64,
    start: int = 0,
    steps: int | None = None,
    sigmas: list[float] | None = None,
    num_classes: int | None = None,
    cond_fn: CondFn | None = None,
    device: str | torch.device = "cpu",
    decode: Decode | None = None,
) -> Tensor:
    """``num_images`` uint8 images ``[N, C, H, W]``, image ``i`` seeded by ``seed + start + i``.

    Class-conditional models (``num_classes`` given or ``model.num_classes``) get labels ``i % num_classes``
    unless ``cond_fn`` is given (:func:`prompt_conditioning` for text-to-image models); latent models give
    ``decode`` (their VAE's ``LatentCodec.decode``).
    """
    spec = sampler_spec(model, steps, sigmas)
    if cond_fn is None:
        n = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        cond_fn = class_conditioning(n) if n else None
    batches = list(iter_generate(model, num_images, seed, batch_size, start, spec, cond_fn, device, decode))
    return torch.cat(batches) if batches else torch.zeros((0, *model.sample_shape), dtype=torch.uint8)
