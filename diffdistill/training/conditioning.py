"""Turn a data batch into what the networks take: prompts into text embeddings, pixels into latents.

The trainer calls :func:`prepare_batch` on every micro-batch before the objective sees it, and the sample grid and
evaluation build their conditioning with :func:`encode_prompts`; both use the teacher's own frozen text encoder
(``teacher.prompt_encoder``, a :class:`~diffdistill.models.text.PromptEncoder`, cached per prompt) and VAE
(``teacher.latent``, a :class:`~diffdistill.models.latent.LatentCodec`). Teachers without them (pixel-space,
class-conditional) get the batch back unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from diffdistill.models.conditioning import Batch, Conditioning


def prompt_encoder_of(teacher: nn.Module):
    """The teacher's text encoder, or ``None``."""
    return getattr(teacher, "prompt_encoder", None)


def latent_codec_of(teacher: nn.Module):
    """The teacher's VAE (latent codec), or ``None`` for pixel-space teachers."""
    return getattr(teacher, "latent", None)


@torch.no_grad()
def encode_prompts(prompts: list[str], teacher: nn.Module, device: torch.device | str | None = None) -> Conditioning:
    """``prompts`` encoded by the teacher's text encoder: ``Conditioning(prompt_embeds, pooled_prompt_embeds)``."""
    encoder = prompt_encoder_of(teacher)
    if encoder is None:
        raise ValueError(
            "the data carries prompts, but the teacher has no text encoder (backbone group): use a text-to-image "
            "teacher (a StableDiffusion pipeline folder) or data without captions (e.g. data=fashion_mnist)"
        )
    if not prompts:
        raise ValueError("no prompts to encode")
    enc = encoder.encode(list(prompts))
    out = Conditioning(prompt_embeds=enc.prompt_embeds, pooled_prompt_embeds=enc.pooled_prompt_embeds)
    return out.to(device) if device is not None else out


def _device(batch: Batch, teacher: nn.Module) -> torch.device:
    if batch.x0 is not None:
        return batch.x0.device
    p = next(teacher.parameters(), None)
    p = next(teacher.buffers(), None) if p is None else p
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def to_latents(x0: torch.Tensor, teacher: nn.Module) -> torch.Tensor:
    """Samples ``x0`` in the teacher's sample space: latents pass through, pixel images are encoded with the
    teacher's VAE (posterior mean, no gradient). A clear error when the shape matches neither."""
    want = tuple(teacher.sample_shape)
    shape = tuple(x0.shape[1:])
    if shape == want:
        return x0
    codec = latent_codec_of(teacher)
    if codec is None:
        raise ValueError(
            f"the data's samples have shape {shape} but the teacher takes {want} and has no VAE to encode them "
            "(check data.resolution / data.channels against the backbone)"
        )
    pixels = tuple(codec.image_shape(want))
    if shape != pixels:
        raise ValueError(
            f"the data's samples have shape {shape}, which is neither the teacher's latent shape {want} nor the "
            f"image shape {pixels} its VAE encodes to it (check data.resolution / data.channels)"
        )
    return codec.encode(x0).to(x0.dtype)


def prepare_batch(batch: Batch, teacher: nn.Module, real_samples: bool = True) -> Batch:
    """``batch`` as the networks take it: its prompts encoded into ``cond.prompt_embeds`` /
    ``pooled_prompt_embeds`` (class labels dropped for a teacher without classes), its pixel ``x0`` encoded into
    the teacher's latent space. The captions stay on the batch (``prompts``) for logging and evaluation; a
    class-conditional teacher without a text encoder ignores the captions of labelled data.

    ``real_samples=False`` (the objective reads no real samples: ``Objective.requires_real_data`` of a data-free
    objective such as DMD, SiD, SIM or VSD): pixel images that only the VAE could turn into latents are dropped
    instead of encoded, when the prompts or labels still give the batch size."""
    x0, cond = batch.x0, batch.cond
    labelled = cond.class_labels is not None and getattr(teacher, "num_classes", None) is not None
    if batch.prompts is not None and (prompt_encoder_of(teacher) is not None or not labelled):
        enc = encode_prompts(batch.prompts, teacher, _device(batch, teacher))
        labels = cond.class_labels if getattr(teacher, "num_classes", None) is not None else None
        cond = replace(
            cond, class_labels=labels, prompt_embeds=enc.prompt_embeds, pooled_prompt_embeds=enc.pooled_prompt_embeds
        )
    if x0 is not None and latent_codec_of(teacher) is not None:
        sized = cond.batch_size == x0.shape[0] or len(batch.prompts or []) == x0.shape[0]
        if not real_samples and sized and tuple(x0.shape[1:]) != tuple(teacher.sample_shape):
            x0 = None  # a VAE encode whose result no loss reads
        else:
            x0 = to_latents(x0, teacher)
    if x0 is batch.x0 and cond is batch.cond:
        return batch
    return Batch(x0, cond, batch.prompts, batch.scratch)
