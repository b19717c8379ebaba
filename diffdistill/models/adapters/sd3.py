"""The SD3 teacher: :class:`~diffdistill.models.adapters.flow.DiffusersFlowDenoiser` with the pipeline's prompt
encoders (two CLIP encoders, optional T5) and VAE attached."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffdistill.models.adapters.flow import DiffusersFlowDenoiser
from diffdistill.models.text import PromptEncoder, _tokenize, read_model_index

# ---------------------------------------------------------------------------------------------
# SD3 prompts: two CLIP encoders (+ T5, optional) exactly as StableDiffusion3Pipeline.encode_prompt


class SD3PromptEncoder(PromptEncoder):
    """Frozen text encoders of an SD3 pipeline: ``encode(prompts) -> Conditioning(prompt_embeds [B, 77 + T, D],
    pooled_prompt_embeds [B, P])``, the same tensors as ``StableDiffusion3Pipeline.encode_prompt``: the two CLIP
    penultimate hidden states side by side, zero-padded to the joint width ``D``, followed by T5's ``T`` tokens (zeros
    when the pipeline has no T5, as ``text_encoder_3=None`` does); the two pooled projections concatenated. Caching,
    negative prompts and :attr:`null_prompt` (the empty prompt's embeddings, SD3's negative default) are
    :class:`~diffdistill.models.text.PromptEncoder`'s.

    Args:
        tokenizers: the two ``CLIPTokenizer`` (+ T5's tokenizer).
        text_encoders: the two ``CLIPTextModelWithProjection`` (+ ``T5EncoderModel``).
        joint_attention_dim: the transformer's ``joint_attention_dim`` (T5's width ``D``).
        max_sequence_length: T5 tokens (the pipeline's default 256).
        cache_dir, cache_size: as :class:`~diffdistill.models.text.PromptEncoder`.
    """

    def __init__(
        self,
        tokenizers: list,
        text_encoders: list[nn.Module],
        joint_attention_dim: int,
        max_sequence_length: int = 256,
        cache_dir: str | Path | None = None,
        cache_size: int = 4096,
    ):
        if len(tokenizers) != len(text_encoders) or len(text_encoders) not in (2, 3):
            raise ValueError("SD3 needs two CLIP tokenizers and text encoders, plus optionally T5's")
        # the two CLIP encoders are SDXL's pair; T5 joins them below (kind "sd3" keys the disk cache apart)
        super().__init__(tokenizers[:2], text_encoders[:2], "sdxl", False, cache_dir, cache_size)
        if len(text_encoders) == 3:
            self.text_encoders.append(text_encoders[2].eval().requires_grad_(False))
            self.tokenizers.append(tokenizers[2])
        self.kind = "sd3"
        self.joint_attention_dim, self.max_sequence_length = int(joint_attention_dim), int(max_sequence_length)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        max_sequence_length: int = 256,
        load_t5: bool = True,
        cache_dir: str | Path | None = None,
        **kw,
    ) -> SD3PromptEncoder:
        """The text encoders and tokenizers of a ``StableDiffusion3Pipeline`` folder or hub id (T5 where the folder
        has one and ``load_t5``)."""
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        from diffdistill.models.io import local_or_hub

        path = str(local_or_hub(path))
        index = read_model_index(path)
        try:
            joint = SD3Transformer2DModel.load_config(path, subfolder="transformer")["joint_attention_dim"]
            tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=f) for f in ("tokenizer", "tokenizer_2")]
            encoders = [
                CLIPTextModelWithProjection.from_pretrained(path, subfolder=f)
                for f in ("text_encoder", "text_encoder_2")
            ]
            if load_t5 and (index.get("text_encoder_3") or [None])[0] is not None:
                from transformers import T5EncoderModel, T5TokenizerFast

                tokenizers.append(T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3"))
                encoders.append(T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3"))
        except (OSError, ValueError, KeyError) as e:
            raise FileNotFoundError(f"could not load the SD3 text encoders of '{path}': {e}") from e
        return cls(tokenizers, encoders, joint, max_sequence_length, cache_dir, **kw)

    def _t5(self, prompts: list[str]) -> Tensor:
        # StableDiffusion3Pipeline._get_t5_prompt_embeds
        if len(self.text_encoders) < 3:
            return torch.zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim, device=self.device)
        ids = self.tokenizers[2](
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoders[2](ids.to(self.device))[0]

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        hidden, pooled = [], []
        for tok, enc in zip(self.tokenizers[:2], self.text_encoders[:2]):
            # StableDiffusion3Pipeline._get_clip_prompt_embeds (clip_skip None: the penultimate hidden state)
            out = enc(_tokenize(tok, prompts).to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        t5 = self._t5(prompts).to(clip.dtype)
        # StableDiffusion3Pipeline.encode_prompt: pad (or crop) CLIP to T5's width, then concatenate the sequences
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


# ---------------------------------------------------------------------------------------------
# the SD3 teacher: adapter + prompt encoder + VAE


def sd3_teacher(
    path: str | Path,
    guidance_scale: float = 1.0,
    max_sequence_length: int = 256,
    load_t5: bool = True,
    sigma_data: float = 1.0,
    feature_blocks: list[int] | None = None,
    cache_dir: str | Path | None = None,
):
    """A frozen SD3 teacher from a ``StableDiffusion3Pipeline`` folder or hub id: a
    :class:`~diffdistill.models.teacher.Teacher` over :class:`DiffusersFlowDenoiser` whose null prompt is the
    empty prompt's embeddings, carrying ``teacher.prompt_encoder`` (:class:`SD3PromptEncoder`, embeddings cached in
    ``cache_dir`` if given) and ``teacher.latent`` (:class:`~diffdistill.models.latent.LatentCodec`) as frozen
    submodules. ``guidance_scale``: CFG ``w`` (1 = none; SD3's pipeline samples at 7.0)."""
    from diffdistill.models.io import local_or_hub
    from diffdistill.models.latent import LatentCodec
    from diffdistill.models.teacher import Teacher
    from diffdistill.models.text import pipeline_kind

    path = local_or_hub(path)
    kind = pipeline_kind(path)
    if kind != "sd3":
        raise ValueError(f"'{path}' is a '{kind}' pipeline; sd3_teacher loads SD3 pipelines (use backbone=sd or sdxl)")
    encoder = SD3PromptEncoder.from_pretrained(path, max_sequence_length, load_t5, cache_dir)
    denoiser = DiffusersFlowDenoiser.from_pretrained(
        path, null_prompt=False, sigma_data=sigma_data, feature_blocks=feature_blocks
    )
    null = encoder.null_prompt
    denoiser.set_null_prompt(null.prompt_embeds, null.pooled_prompt_embeds)
    teacher = Teacher(denoiser, guidance_scale)
    teacher.prompt_encoder = encoder
    teacher.latent = LatentCodec.from_pretrained(path, subfolder="vae")
    return teacher


__all__ = ["SD3PromptEncoder", "sd3_teacher"]
