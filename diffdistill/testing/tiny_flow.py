"""Tiny random-weight flow-matching pipelines built offline from config (tests and benchmarks only).

:func:`tiny_sd3_pipeline` writes a ``StableDiffusion3Pipeline`` folder shaped like SD3 (16 latent channels, two CLIP
text encoders with projections, no T5, ``FlowMatchEulerDiscreteScheduler`` with ``shift = 3.0``), built like the
dummy components of diffusers' own fast tests
(``tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py``) but without their hub T5, with the
23-token CLIP tokenizer of transformers' tests. Nothing is downloaded.

Load it as SD3 without T5 is loaded: ``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None,
tokenizer_3=None)`` (the pipeline lists T5 as a required component).
"""

from __future__ import annotations

from pathlib import Path

import torch

SD3_SHIFT = 3.0  # SD3's scheduler_config.json
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609  # SD3's vae/config.json
CLIP_DIM = 32  # hidden size and projection dim of each tiny CLIP text encoder


def tiny_clip_text_encoder(seed: int):
    """A tiny ``CLIPTextModelWithProjection`` matching the 23-token test tokenizer (bos 21, eos = pad 22)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffdistill.models.tokenizer import TINY_VOCAB

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=CLIP_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=CLIP_DIM,
        vocab_size=len(TINY_VOCAB),
        bos_token_id=len(TINY_VOCAB) - 2,
        eos_token_id=len(TINY_VOCAB) - 1,
        pad_token_id=len(TINY_VOCAB) - 1,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_transformer_config(image_size: int = 16) -> dict:
    """``SD3Transformer2DModel`` config: 2 joint blocks, inner dim 16, patch 2, SD3's 16 latent channels.

    ``joint_attention_dim = 64`` holds the two CLIP hidden states side by side (SD3 pads them to T5's width);
    ``pooled_projection_dim = 64`` is the two pooled projections concatenated (``encode_prompt``)."""
    return dict(
        sample_size=image_size // 2,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=2 * CLIP_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_DIM,
        out_channels=16,
        pos_embed_max_size=16,
    )


def tiny_sd3_pipeline(folder: str | Path, seed: int = 0, image_size: int = 16, shift: float = SD3_SHIFT) -> Path:
    """Write a tiny random ``StableDiffusion3Pipeline`` into ``folder`` and return it.

    Components: ``SD3Transformer2DModel`` (:func:`tiny_sd3_transformer_config`), an ``AutoencoderKL`` with 16
    latent channels, no quant convs and SD3's ``scaling_factor`` / ``shift_factor`` (2 blocks: ``image_size`` pixels
    are ``image_size / 2`` latents), two tiny ``CLIPTextModelWithProjection`` with the 23-token tokenizer,
    ``text_encoder_3 = tokenizer_3 = None`` (the pipeline feeds zeros in T5's place) and
    ``FlowMatchEulerDiscreteScheduler(shift=shift)``. Deterministic in ``seed``.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from diffdistill.models.tokenizer import clip_tokenizer

    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4 (VAE factor 2 x patch 2), got {image_size}")
    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**tiny_sd3_transformer_config(image_size))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=SD3_VAE_SCALING,
        shift_factor=SD3_VAE_SHIFT,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift)),
        vae=vae.eval(),
        text_encoder=tiny_clip_text_encoder(seed + 2),
        tokenizer=clip_tokenizer(kind="tiny"),
        text_encoder_2=tiny_clip_text_encoder(seed + 3),
        tokenizer_2=clip_tokenizer(kind="tiny"),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(str(folder))
    return folder
