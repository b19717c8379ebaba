"""Offline CLIP tokenizer, prompt encoder and latent codec agree with open_clip and diffusers' own pipelines."""

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline, StableDiffusionXLPipeline

from diffdistill.models.latent import LatentCodec
from diffdistill.models.text import PromptEncoder, pipeline_kind
from diffdistill.models.tokenizer import clip_tokenizer, write_vocab_files
from diffdistill.testing.tiny_t2i import tiny_sd_pipeline

PROMPTS = ["a photo of a lower sneaker", "wider newer", ""]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    return {
        "sd": tiny_sd_pipeline(root / "sd", "sd"),
        "sdxl": tiny_sd_pipeline(root / "sdxl", "sdxl", seed=1),
    }


def test_clip_tokenizer_ids_equal_open_clip(tmp_path, no_network):
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer()
    tok = clip_tokenizer(tmp_path / "tok")
    from transformers import CLIPTokenizer

    reloaded = CLIPTokenizer.from_pretrained(str(write_vocab_files(tmp_path / "files")), model_max_length=77)
    assert len(tok) == 49408 and tok.model_max_length == 77
    for prompt in ["a photo of a cat", "An ankle-boot, 3 sneakers & a T-shirt!", "héllo wörld's   spaces"]:
        ids = [ref.sot_token_id, *ref.encode(prompt), ref.eot_token_id]
        assert tok(prompt).input_ids == ids == reloaded(prompt).input_ids
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70  # HF pads with <|endoftext|>, open_clip with 0
    assert CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))("a cat").input_ids == tok("a cat").input_ids
    with pytest.raises(ValueError, match="tokenizer kind"):
        clip_tokenizer(kind="bert")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_prompt_encoder_equals_pipeline_encode_prompt(folders, kind, no_network):
    folder = folders[kind]
    assert pipeline_kind(folder) == kind
    enc = PromptEncoder.from_pretrained(folder)
    cond = enc.encode(PROMPTS, negative_prompts="lowest")
    if kind == "sd":
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        c, u = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=["lowest"] * 3)
        assert cond.pooled_prompt_embeds is None
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
        c, u, pc, pu = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=["lowest"] * 3)
        torch.testing.assert_close(cond.pooled_prompt_embeds, pc)
        torch.testing.assert_close(cond.negative_pooled_prompt_embeds, pu)
        # no negative prompt: SDXL's pipeline zeroes the unconditional side (force_zeros_for_empty_prompt)
        _, u0, _, pu0 = pipe.encode_prompt(PROMPTS[:1], device="cpu")
        assert enc.force_zeros_for_empty_prompt and u0.abs().max() == 0 and pu0.abs().max() == 0
    torch.testing.assert_close(cond.prompt_embeds, c)
    torch.testing.assert_close(cond.negative_prompt_embeds, u)
    null = enc.null_prompt
    assert null.prompt_embeds.shape == (1, *c.shape[1:])
    if kind == "sd":  # the empty prompt's embeddings, as the pipeline's default negative side
        _, u_empty = pipe.encode_prompt(PROMPTS[:1], "cpu", 1, True)
        torch.testing.assert_close(null.prompt_embeds, u_empty)
    else:
        assert null.prompt_embeds.abs().max() == 0 and null.pooled_prompt_embeds.shape == (1, 32)


def test_prompt_cache_memory_and_disk(folders, tmp_path, monkeypatch, no_network):
    enc = PromptEncoder.from_pretrained(folders["sdxl"], cache_dir=tmp_path / "cache", cache_size=2)
    calls = []
    encode = enc._encode_uncached
    monkeypatch.setattr(enc, "_encode_uncached", lambda p: calls.append(list(p)) or encode(p))
    first = enc.encode(["lower", "wider", "lower"])
    assert calls == [["lower", "wider"]]  # duplicates encoded once
    again = enc.encode(["wider", "lower"])
    assert len(calls) == 1 and torch.equal(again.prompt_embeds, first.prompt_embeds[[1, 0]])
    enc.encode(["newer"])  # evicts the least recently used prompt from memory (cache_size = 2)
    assert len(enc._cache) == 2
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3

    fresh = PromptEncoder.from_pretrained(folders["sdxl"], cache_dir=tmp_path / "cache")
    monkeypatch.setattr(fresh, "_encode_uncached", lambda p: pytest.fail(f"re-encoded {p} despite the disk cache"))
    hit = fresh.encode(["lower", "wider"])
    torch.testing.assert_close(hit.prompt_embeds, first.prompt_embeds[:2])
    torch.testing.assert_close(hit.pooled_prompt_embeds, first.pooled_prompt_embeds[:2])
    other = PromptEncoder.from_pretrained(folders["sd"], cache_dir=tmp_path / "cache")
    assert other.fingerprint() != fresh.fingerprint()  # another encoder never reads these entries
    with pytest.raises(ValueError, match="negative prompts"):
        enc.encode(["a", "b"], negative_prompts=["x", "y", "z"])


def test_latent_codec_matches_vae_with_scaling(folders, no_network):
    codec = LatentCodec.from_pretrained(folders["sd"])
    vae = AutoencoderKL.from_pretrained(folders["sd"], subfolder="vae")
    sf = vae.config.scaling_factor
    assert codec.scaling_factor == sf == 0.18215 and codec.scale_factor == 2
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = codec.encode(x)
        torch.testing.assert_close(z, vae.encode(x).latent_dist.mean * sf)
        # pipeline_stable_diffusion.py decode_latents: vae.decode(latents / scaling_factor)
        torch.testing.assert_close(codec.decode(z), vae.decode(z / sf).sample)
        sampled = LatentCodec(vae, sample_posterior=True).encode(x, torch.Generator().manual_seed(0))
    assert not torch.allclose(sampled, z)
    assert codec.latent_shape((2, 3, 16, 16)) == (2, 4, 8, 8) and codec.image_shape((4, 8, 8)) == (3, 16, 16)
    with pytest.raises(ValueError, match="divisible"):
        codec.latent_shape((3, 15, 16))


def test_latent_codec_tiny_autoencoder_and_shift(no_network):
    torch.manual_seed(0)
    taesd = AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
        scaling_factor=1.5,
        shift_factor=0.25,
    )
    codec = LatentCodec(taesd)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = codec.encode(x)
        torch.testing.assert_close(z, (taesd.encode(x).latents - 0.25) * 1.5)  # SD3 / Flux: (z - shift) * scale
        torch.testing.assert_close(codec.decode(z), taesd.decode(z / 1.5 + 0.25).sample)
    assert z.shape == (1, *codec.latent_shape((3, 16, 16)))
    with pytest.raises(TypeError, match="LatentCodec wraps"):
        LatentCodec(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind,tokenizer", [("sd", "clip"), ("sdxl", "tiny")])
def test_tiny_pipeline_loads_and_samples_offline(kind, tokenizer, tmp_path, no_network):
    cls = StableDiffusionPipeline if kind == "sd" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(tiny_sd_pipeline(tmp_path / kind, kind, tokenizer=tokenizer, image_size=24))
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert len(pipe.tokenizer) == (49408 if tokenizer == "clip" else 23)
    images = pipe("a lower sneaker", num_inference_steps=1, output_type="pt").images
    assert images.shape == (1, 3, 24, 24) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="kind"):
        tiny_sd_pipeline(tmp_path / "x", "sd3")
