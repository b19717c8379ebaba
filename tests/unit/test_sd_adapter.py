"""The SD-family UNet adapter reproduces diffusers' own x0 predictions, CFG and guidance embedding on tiny pipelines."""

import copy

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from diffdistill.models.adapters.sd import DiffusersSDDenoiser, guidance_scale_embedding, sd_teacher
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.io import load_model, model_config, save_model
from diffdistill.models.teacher import Teacher, can_guide
from diffdistill.testing.tiny_t2i import tiny_sd_pipeline

PROMPTS = ["lower newer", "wider lowest"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    return {
        ("sd", "epsilon"): tiny_sd_pipeline(root / "sd_eps", "sd", "epsilon"),
        ("sd", "v_prediction"): tiny_sd_pipeline(root / "sd_v", "sd", "v_prediction", seed=1),
        ("sdxl", "epsilon"): tiny_sd_pipeline(root / "sdxl_eps", "sdxl", "epsilon", seed=2),
        ("sdxl", "v_prediction"): tiny_sd_pipeline(root / "sdxl_v", "sdxl", "v_prediction", seed=3),
    }


def _pipe(folder, kind):
    cls = StableDiffusionPipeline if kind == "sd" else StableDiffusionXLPipeline
    return cls.from_pretrained(folder)


def _pipeline_embeds(pipe, kind, prompts):
    """(cond kwargs, uncond kwargs) for the UNet, as the pipeline builds them (default negative prompt)."""
    if kind == "sd":
        c, u = pipe.encode_prompt(prompts, "cpu", 1, True)
        return {"encoder_hidden_states": c}, {"encoder_hidden_states": u}
    c, u, pc, pu = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), c.dtype, pc.shape[-1]).repeat(len(prompts), 1)
    return (
        {"encoder_hidden_states": c, "added_cond_kwargs": {"text_embeds": pc, "time_ids": time_ids}},
        {"encoder_hidden_states": u, "added_cond_kwargs": {"text_embeds": pu, "time_ids": time_ids}},
    )


def _edm_point(sched, t, shape, seed=0):
    """A VP sample at integer timestep ``t`` and its EDM view ``(x = x_vp / alpha, sigma)``."""
    g = torch.Generator().manual_seed(seed)
    x_vp = torch.randn(shape, generator=g)
    abar = sched.alphas_cumprod[t].float()
    sigma = ((1 - abar) / abar).sqrt().repeat(shape[0])
    return x_vp, x_vp / abar.sqrt(), sigma


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("t", [0, 250, 999])
def test_x0_matches_ddpm_scheduler_step(folders, kind, prediction_type, t, no_network):
    folder = folders[(kind, prediction_type)]
    teacher = sd_teacher(folder)
    den, pipe = teacher.denoiser, _pipe(folder, kind)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert den.prediction_type == prediction_type == sched.config.prediction_type
    x_vp, x, sigma = _edm_point(sched, t, (2, 4, 8, 8))
    cond_kw, _ = _pipeline_embeds(pipe, kind, PROMPTS)
    with torch.no_grad():
        out = pipe.unet(x_vp, torch.tensor([t, t]), **cond_kw).sample
        ref = torch.stack([sched.step(out[i : i + 1], t, x_vp[i : i + 1]).pred_original_sample[0] for i in range(2)])
        x0 = den(x, sigma, teacher.prompt_encoder.encode(PROMPTS))
    assert torch.allclose(den.schedule.sigma_to_t(sigma), torch.tensor([float(t)] * 2), atol=1e-3)
    torch.testing.assert_close(x0, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_prompt_cfg_equals_pipeline_combination(folders, kind, no_network):
    folder, w, t = folders[(kind, "epsilon")], 4.0, 500
    teacher = sd_teacher(folder, guidance_scale=w)
    pipe = _pipe(folder, kind)
    sched = pipe.scheduler
    x_vp, x, sigma = _edm_point(sched, t, (2, 4, 8, 8), seed=1)
    cond_kw, uncond_kw = _pipeline_embeds(pipe, kind, PROMPTS)
    with torch.no_grad():
        eps_c = pipe.unet(x_vp, t, **cond_kw).sample
        eps_u = pipe.unet(x_vp, t, **uncond_kw).sample
        eps = eps_u + w * (eps_c - eps_u)  # pipeline_stable_diffusion.py: noise_pred_uncond + w (text - uncond)
        ref = sched.step(eps, t, x_vp).pred_original_sample
        x0 = teacher(x, sigma, teacher.prompt_encoder.encode(PROMPTS))
    torch.testing.assert_close(x0, ref, atol=2e-4, rtol=1e-4)
    if kind == "sdxl":  # force_zeros_for_empty_prompt: the null prompt is zeros
        assert teacher.null_prompt.prompt_embeds.abs().max() == 0


def test_prompt_teacher_follows_its_guidance_scale(folders, no_network):
    teacher = sd_teacher(folders[("sd", "epsilon")])
    assert can_guide(teacher)
    x, sigma = torch.randn(2, 4, 8, 8) * 2, torch.tensor([2.0, 2.0])
    cond = teacher.prompt_encoder.encode(PROMPTS)
    assert teacher.guides(cond, 3.0) and not teacher.guides(cond, 1.0)
    with torch.no_grad():
        plain, guided = teacher(x, sigma, cond), teacher(x, sigma, cond, guidance_scale=3.0)
        uncond = teacher.denoiser(x, sigma, Conditioning())  # no prompt: the null prompt
    assert (guided - plain).abs().mean() > 1e-2 * plain.abs().mean()  # fails if prompts get no guidance
    torch.testing.assert_close(guided, uncond + 3.0 * (plain - uncond), atol=1e-5, rtol=1e-5)
    # a negative prompt replaces the null prompt on the unconditional side
    neg = teacher.prompt_encoder.encode(PROMPTS, negative_prompts="newer")
    with torch.no_grad():
        x0_neg = teacher.denoiser(x, sigma, teacher.prompt_encoder.encode(["newer", "newer"]))
        torch.testing.assert_close(teacher(x, sigma, neg, 3.0), x0_neg + 3.0 * (plain - x0_neg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_save_load_round_trip_with_guidance_embedding(folders, kind, tmp_path, no_network):
    teacher = sd_teacher(folders[(kind, "v_prediction")])
    den = copy.deepcopy(teacher.denoiser).requires_grad_(True)
    cond = teacher.prompt_encoder.encode(PROMPTS)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 5.0])
    cond.guidance_scale = torch.tensor([2.0, 6.0])
    with torch.no_grad():
        before = den(x, sigma, cond)
        den.enable_guidance_embedding()
        assert den.guidance_emb is den.unet.time_embedding.cond_proj and den.unet.config.time_cond_proj_dim == 256
        torch.testing.assert_close(den(x, sigma, cond), before)  # zero-initialised: the output is unchanged
        torch.nn.init.normal_(den.guidance_emb.weight, std=0.5)
        out = den(x, sigma, cond)
    assert (out - before).abs().max() > 1e-3
    save_model(den, model_config(den), tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, DiffusersSDDenoiser) and loaded.guidance_emb is not None
    torch.testing.assert_close(loaded.null_prompt_embeds, den.null_prompt_embeds)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, cond), out)
    assert loaded.prior_std(3.0) == pytest.approx(10**0.5)
    torch.testing.assert_close(loaded.prior_std(torch.tensor([0.0, 3.0])), torch.tensor([1.0, 10**0.5]))


def test_guidance_embedding_is_diffusers_timestep_cond(folders, no_network):
    """The student's guidance input is the pipeline's ``get_guidance_scale_embedding(w - 1)`` fed as timestep_cond,
    so a stock pipeline (which feeds exactly that) reproduces it; lora.adapters_disabled switches it off."""
    from diffdistill.models.lora import adapters_disabled

    folder = folders[("sd", "epsilon")]
    pipe = _pipe(folder, "sd")
    teacher = sd_teacher(folder)
    den = copy.deepcopy(teacher.denoiser)
    den.enable_guidance_embedding()
    torch.nn.init.normal_(den.guidance_emb.weight, std=0.5)
    w = torch.tensor([1.0, 7.5])
    ref_emb = pipe.get_guidance_scale_embedding(w - 1, embedding_dim=256)
    torch.testing.assert_close(guidance_scale_embedding(w - 1, 256), ref_emb)
    x_vp, x, sigma = _edm_point(pipe.scheduler, 300, (2, 4, 8, 8))
    cond = teacher.prompt_encoder.encode(PROMPTS)
    cond.guidance_scale = w
    with torch.no_grad():
        eps = den.unet(x_vp, 300, encoder_hidden_states=cond.prompt_embeds, timestep_cond=ref_emb).sample
        torch.testing.assert_close(den(x, sigma, cond), x - sigma[:, None, None, None] * eps, atol=1e-5, rtol=1e-5)
        with adapters_disabled(den):
            assert den.guidance_emb is None
            torch.testing.assert_close(den(x, sigma, cond), teacher.denoiser(x, sigma, cond))
    assert den.guidance_emb is not None


def test_features_taps_skip_the_decoder(folders, no_network):
    den = sd_teacher(folders[("sdxl", "epsilon")]).denoiser
    calls = []
    hook = den.unet.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        feats = den.features(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]))  # no prompt: the null prompt
    finally:
        hook.remove()
    assert [f.shape for f in feats] == [(2, 4, 4, 4), (2, 8, 4, 4), (2, 8, 4, 4)] and not calls


def test_bad_inputs_fail_clearly(folders, no_network):
    den = sd_teacher(folders[("sdxl", "epsilon")]).denoiser
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([1.0])
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        den(x, sigma, Conditioning(prompt_embeds=torch.zeros(1, 77, 64)))
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersSDDenoiser(den.unet, den.schedule.alphas_cumprod, "sample")
    bare = DiffusersSDDenoiser(copy.deepcopy(den.unet), den.schedule.alphas_cumprod)
    assert bare.null_prompt is None and not can_guide(Teacher(bare, 3.0))
    with pytest.raises(ValueError, match="needs cond.prompt_embeds"):
        bare(x, sigma)


@pytest.mark.parametrize("option,kind", [("sd", "sd"), ("sdxl", "sdxl")])
def test_backbone_config_builds_the_teacher(folders, option, kind, no_network):
    from hydra.utils import instantiate

    from tests.helpers import compose_train

    folder = folders[(kind, "epsilon")]
    cfg = compose_train(
        ["~experiment", f"backbone={option}", f"backbone.path={folder}", "backbone.guidance_scale=2.0"]
        + ["data=synthetic", "trainer=tiny", "trainer.device=cpu"]
    )
    teacher = instantiate(cfg.backbone)
    assert isinstance(teacher, Teacher) and teacher.guidance_scale == 2.0
    assert teacher.prompt_encoder.kind == kind and teacher.latent.scale_factor == 2
    assert teacher.denoiser.is_sdxl == (kind == "sdxl") and teacher.sample_shape == (4, 8, 8)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_denoise_with_features_on_the_sd_adapter_is_one_pass(folders, no_network):
    """The fused pass (DMD2's critic) gives the adapter's x0_hat and the same taps as ``features``."""
    from diffdistill.models.backbones import denoise_with_features

    den = sd_teacher(folders[("sd", "epsilon")]).denoiser
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 3.0])
    out, taps = denoise_with_features(den, x, sigma)
    torch.testing.assert_close(out, den(x, sigma), rtol=0, atol=0)
    ref = den.features(x, sigma)
    assert [t.shape for t in taps] == [t.shape for t in ref]
    for a, b in zip(taps, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
