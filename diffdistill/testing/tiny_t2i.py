"""Tiny random Stable Diffusion / SDXL pipeline folders, written offline from config (no hub download).

The component configs follow diffusers' own fast tests (``tests/pipelines/stable_diffusion/test_stable_diffusion.py``
and ``.../stable_diffusion_xl/test_stable_diffusion_xl.py`` ``get_dummy_components``), shrunk; the tokenizer is built
offline (:mod:`diffdistill.models.tokenizer`). Every test and benchmark of a text-to-image teacher uses these folders.
"""

from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("sd", "sdxl")
# SD 1.x / 2.x and SDXL VAE scaling factors (the hub's ``vae/config.json``)
SCALING_FACTOR = {"sd": 0.18215, "sdxl": 0.13025}
TEXT_DIM = 32  # hidden size of each tiny CLIP text encoder
TIME_EMBED_DIM = 8  # SDXL ``addition_time_embed_dim``


def tiny_unet_config(kind: str = "sd", sample_size: int = 8, time_cond_proj_dim: int | None = None) -> dict:
    """The config of a tiny ``UNet2DConditionModel`` (SD: cross-attention on one text encoder; SDXL: two encoders
    concatenated, plus the ``text_time`` added conditions: 6 time ids and the pooled text embedding)."""
    base = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        time_cond_proj_dim=time_cond_proj_dim,
    )
    if kind == "sd":
        return {**base, "cross_attention_dim": TEXT_DIM, "attention_head_dim": 2}
    if kind == "sdxl":
        return {
            **base,
            "cross_attention_dim": 2 * TEXT_DIM,
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": TIME_EMBED_DIM,
            "transformer_layers_per_block": (1, 2),
            # 6 SDXL time ids x addition_time_embed_dim + the pooled embedding of text_encoder_2
            "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + TEXT_DIM,
        }
    raise ValueError(f"kind must be one of {KINDS}, got '{kind}'")


def tiny_vae_config(kind: str = "sd") -> dict:
    """A tiny ``AutoencoderKL`` (two blocks: ``vae_scale_factor = 2``, 4 latent channels)."""
    return dict(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
        scaling_factor=SCALING_FACTOR[kind],
    )


def tiny_text_config(tokenizer, projection: bool = False):
    """A tiny ``CLIPTextConfig`` whose vocabulary and special tokens match ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=TEXT_DIM if projection else 512,
    )


def ddpm_scheduler(prediction_type: str = "epsilon"):
    """Stable Diffusion's training schedule as a ``DDPMScheduler`` (scaled_linear 0.00085..0.012, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def tiny_sd_pipeline(
    folder: str | Path,
    kind: str = "sd",
    prediction_type: str = "epsilon",
    seed: int = 0,
    image_size: int = 16,
    tokenizer: str = "tiny",
) -> Path:
    """Write a tiny random ``StableDiffusionPipeline`` (``kind="sd"``) or ``StableDiffusionXLPipeline``
    (``"sdxl"``) folder and return its path; it loads with ``from_pretrained(folder)`` and samples offline.

    Args:
        folder: where to write the pipeline (created).
        kind: ``"sd"`` or ``"sdxl"``.
        prediction_type: the scheduler's ``epsilon`` or ``v_prediction``.
        seed: seeds every component's random weights.
        image_size: pixel resolution; latents are ``image_size // 2`` (a two-block VAE), so it must be even.
        tokenizer: ``"tiny"`` (23 tokens, fast) or ``"clip"`` (the real CLIP vocabulary, 49,408 tokens).
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffdistill.models.tokenizer import clip_tokenizer

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got '{kind}'")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got '{prediction_type}'")
    if image_size % 4 or image_size < 8:
        raise ValueError(f"image_size must be a multiple of 4 and >= 8 (latents of image_size / 2), got {image_size}")
    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(kind, image_size // 2))
    vae = AutoencoderKL(**tiny_vae_config(kind))
    tok = clip_tokenizer(kind=tokenizer)
    text_encoder = CLIPTextModel(tiny_text_config(tok))
    scheduler = ddpm_scheduler(prediction_type)
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler)
    if kind == "sd":
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    else:
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tok, projection=True))
        pipe = StableDiffusionXLPipeline(
            **parts,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tok,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
