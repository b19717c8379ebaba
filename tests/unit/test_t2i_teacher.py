"""The packaged tiny text-to-image teacher (diffdistill/assets/teachers/fashion_mnist_t2i): a stock diffusers
StableDiffusionPipeline folder that loads offline, samples from class prompts and guides through diffdistill."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from diffdistill.utils.paths import ASSETS, PACKAGE

FOLDER = ASSETS / "teachers" / "fashion_mnist_t2i"
# the script that built the folder (its configs are checked against the shipped ones)
_spec = importlib.util.spec_from_file_location("build_t2i_teacher", PACKAGE.parent / "scripts" / "build_t2i_teacher.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        p = StableDiffusionPipeline.from_pretrained(FOLDER)
    finally:
        mp.undo()
    p.set_progress_bar_config(disable=True)
    return p


def _sample(pipe, prompts, steps=10, w=3.0, seed=0):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(seed) for _ in prompts]  # the same noise for every prompt
    return pipe(prompts, num_inference_steps=steps, guidance_scale=w, generator=gens, output_type="pt").images


def test_folder_is_under_20_mib():
    files = [f for f in FOLDER.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    assert total < 20 * 2**20, f"{total / 2**20:.2f} MiB"
    assert (FOLDER / "BUILD.md").exists() and (FOLDER / "model_index.json").exists()


def test_folder_matches_the_build_recipe():
    """The shipped configs are the ones scripts/build_t2i_teacher.py writes (it and BUILD.md describe this folder)."""
    unet = json.loads((FOLDER / "unet" / "config.json").read_text())
    for k, v in build.UNET_CONFIG.items():
        assert unet[k] == (list(v) if isinstance(v, tuple) else v), k
    sched = json.loads((FOLDER / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler"
    for k, v in build.SCHEDULER_CONFIG.items():
        assert sched[k] == v, k
    text = json.loads((FOLDER / "text_encoder" / "config.json").read_text())
    for k, v in build.TEXT_CONFIG.items():
        assert text[k] == v, k
    vae = json.loads((FOLDER / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] != 0.18215 and 0.1 < vae["scaling_factor"] < 10  # fitted: 1 / std of the latents


def test_stock_pipeline_samples_offline(pipe):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    out = pipe(
        "a photo of a sneaker", num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    assert out.std() > 0.05  # an image, not a flat field


def test_tokenizer_is_the_real_clip_vocabulary(pipe):
    tok = pipe.tokenizer
    assert tok.model_max_length == 77 and len(tok) == 49408
    # open_clip SimpleTokenizer ids of the same prompt (OpenAI CLIP's BPE)
    assert tok("a photo of a sneaker").input_ids == [49406, 320, 1125, 539, 320, 24781, 49407]


def test_class_prompts_have_distinct_embeddings(pipe):
    tok = pipe.tokenizer
    ids = tok(build.prompts(), padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h = pipe.text_encoder(ids)[0]
    cls = torch.nn.functional.normalize(h[:, 5], dim=1)  # the first class-name token, after "a photo of a"
    cos = (cls @ cls.T)[~torch.eye(10, dtype=torch.bool)]
    assert cos.max() < 0.8, cos.max()


def test_class_prompts_give_different_samples(pipe):
    images = _sample(pipe, build.prompts())  # same noise, 10 prompts
    d = (images[:, None] - images[None]).abs().mean(dim=(2, 3, 4))
    off = d[~torch.eye(10, dtype=torch.bool)]
    assert off.min() > 0.04, off.min()  # 0.08 for the shipped weights
    # a trouser is narrower than a bag: the mean brightness of trousers is lower (the items are light on black)
    trouser, bag = images[build.CLASS_WORDS.index("trouser")], images[build.CLASS_WORDS.index("bag")]
    assert trouser.mean() < bag.mean()


def test_diffdistill_teacher_guides_with_prompts():
    sd = pytest.importorskip("diffdistill.models.adapters.sd")
    from diffdistill.models.conditioning import Conditioning
    from diffdistill.models.teacher import can_guide

    teacher = sd.sd_teacher(FOLDER, guidance_scale=3.0)
    assert can_guide(teacher) and teacher.latent is not None and teacher.prompt_encoder is not None
    cond = teacher.prompt_encoder.encode(["a photo of a trouser", "a photo of a bag"])
    g = torch.Generator().manual_seed(0)
    sigma = torch.full((2,), 2.0)
    x = torch.randn(2, 4, 8, 8, generator=g) * (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
    with torch.no_grad():
        x0_w3 = teacher(x, sigma, cond)
        x0_c = teacher(x, sigma, cond, guidance_scale=1.0)
        null = teacher.denoiser.null_prompt
        x0_u = teacher.denoiser(x, sigma, Conditioning(prompt_embeds=null.prompt_embeds.expand(2, -1, -1)))
    assert (x0_w3 - x0_c).abs().mean() > 0.05  # guidance is not ignored (0.44 for the shipped weights)
    torch.testing.assert_close(x0_w3, x0_u + 3.0 * (x0_c - x0_u), rtol=1e-4, atol=1e-4)  # CFG on x0


# ---------------------------------------------------------------- diffdistill.models.vae_fit (how the VAE was made)

TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 8],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 8,
}


def test_center_latents_is_exact():
    from diffdistill.models.vae_fit import build_vae, center_latents, latent_channel_mean

    torch.manual_seed(0)
    vae = build_vae(TINY_VAE).eval()
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        before = vae.decode(z).sample
        mean = latent_channel_mean(vae, x, batch_size=3)
        torch.testing.assert_close(mean, z.mean(dim=(0, 2, 3)))
        center_latents(vae, mean + 0.5)  # an offset on top, so the test does not pass for a zero mean
        z2 = vae.encode(x).latent_dist.mean
        after = vae.decode(z2).sample
    torch.testing.assert_close(z2, z - (mean + 0.5).view(1, -1, 1, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_fit_vae_scales_latents_to_unit_std_and_refuses_bad_images():
    from diffdistill.models.vae_fit import fit_vae

    x = torch.rand(16, 3, 8, 8) * 2 - 1
    vae = fit_vae(x, TINY_VAE, steps=3, batch_size=8, log=lambda s: None)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert abs(z.std().item() - 1.0) < 1e-3 and z.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fit_vae(x * 127.5 + 127.5, TINY_VAE, steps=1)
    with pytest.raises(ValueError, match="float32"):
        fit_vae((x * 127.5 + 127.5).to(torch.uint8), TINY_VAE, steps=1)


def test_teacher_from_pretrained_loads_the_packaged_pipeline_by_name():
    """``Teacher.from_pretrained("fashion_mnist_t2i")`` is the SD adapter's teacher, with its text encoder and VAE."""
    from diffdistill.models import Teacher
    from diffdistill.models.adapters.sd import DiffusersSDDenoiser

    teacher = Teacher.from_pretrained("fashion_mnist_t2i", guidance_scale=3.0)
    assert isinstance(teacher.denoiser, DiffusersSDDenoiser) and teacher.guidance_scale == 3.0
    assert teacher.prompt_encoder is not None and teacher.latent is not None
