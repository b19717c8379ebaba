"""The rectified-flow transformer adapter (SD3) against diffusers' own transformer, scheduler and pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from diffdistill.conventions import edm_to_rf, rf_to_edm
from diffdistill.models.conditioning import Conditioning
from diffdistill.schedules.flow import (
    calculate_shift,
    dynamic_shift_factor,
    flow_shift,
    logit_normal_as_lognormal,
    shift_sigma,
    u_to_sigma,
)

pytest.importorskip("diffusers")

PROMPTS = ["low", "wider newer"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffdistill.testing.tiny_flow import tiny_sd3_pipeline

    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe", seed=0)


@pytest.fixture(scope="module")
def teacher(folder):
    from diffdistill.models.adapters.sd3 import sd3_teacher

    return sd3_teacher(folder, guidance_scale=1.0)


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)


@pytest.fixture(scope="module")
def cond(teacher):
    return teacher.prompt_encoder.encode(PROMPTS)


def _latents(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_edm_flow_maps_round_trip_and_shift_is_a_sigma_scaling():
    u = torch.tensor([0.001, 0.2, 0.5, 0.9, 0.999], dtype=torch.float64)
    x_rf = torch.randn(5, 3, dtype=torch.float64)
    x, sigma = rf_to_edm(x_rf, u)
    back, u2 = edm_to_rf(x, sigma)
    assert torch.allclose(back, x_rf) and torch.allclose(u2, u)
    assert torch.allclose(sigma, u / (1 - u))
    # the SD3 shift u' = s u / (1 + (s-1) u) is sigma' = s sigma in the EDM view
    _, shifted = rf_to_edm(x_rf, flow_shift(u, 3.0))
    assert torch.allclose(shifted, shift_sigma(sigma, 3.0))


def test_shifted_logit_normal_u_is_a_lognormal_sigma():
    n = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m, s, shift = 0.3, 0.8, 3.0
    u = flow_shift(torch.sigmoid(m + s * n), shift)  # SD3's training u (logit-normal, then the shift)
    p_mean, p_std = logit_normal_as_lognormal(shift, m, s)
    assert torch.allclose(u_to_sigma(u), torch.exp(p_mean + p_std * n))


def test_dynamic_shift_equals_the_scheduler_time_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    mu = calculate_shift(1024)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for kind in ("exponential", "linear"):
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=kind)
        m = mu if kind == "exponential" else 1.7
        assert torch.allclose(sched.time_shift(m, 1.0, t), flow_shift(t, dynamic_shift_factor(m, kind)))


def test_x0_is_x_rf_minus_u_v_of_the_transformer(teacher, cond):
    d = teacher.denoiser
    x = _latents() * 3.0
    sigma = torch.tensor([0.5, 4.0])
    u = sigma / (1 + sigma)
    x_rf = x * (1 - u)[:, None, None, None]
    with torch.no_grad():
        v = d.transformer(
            hidden_states=x_rf,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            timestep=1000 * u,
        ).sample
        x0 = d(x, sigma, cond)
    assert torch.allclose(x0, x_rf - u[:, None, None, None] * v, atol=1e-6)
    assert d.prior_std(torch.tensor([2.0])).item() == 3.0  # x_rf = z


def test_euler_step_equals_flow_match_euler_scheduler_step(teacher, cond):
    from diffdistill.sampling import euler_sample

    d = teacher.denoiser
    sched = d.scheduler()
    sched.set_timesteps(4)
    i = 1
    t, u, u_next = sched.timesteps[i], sched.sigmas[i], sched.sigmas[i + 1]
    x_rf = _latents(1)
    with torch.no_grad():
        v = d.transformer(
            hidden_states=x_rf,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            timestep=t.expand(2),
        ).sample
    ref = sched.step(v, t, x_rf).prev_sample
    s, s_next = float(u / (1 - u)), float(u_next / (1 - u_next))
    ours = euler_sample(d, x_rf * (1 + s), torch.tensor([s, s_next]), cond) / (1 + s_next)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_shifted_grid_equals_the_scheduler_sigmas(teacher):
    from diffusers import FlowMatchEulerDiscreteScheduler

    d = teacher.denoiser
    assert d.shift() == 3.0
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(6)
    u = ref.sigmas.double()
    grid = d.shifted_sigmas(6)
    assert grid.shape == (7,) and grid[-1] == 0
    assert grid[0] == pytest.approx(d.sigma_max)  # u = 1: clamped to u_max = 1 - 1/1000
    assert torch.allclose(grid[1:].double(), u[1:] / (1 - u[1:]), rtol=1e-5)
    # custom unshifted sigmas go through the same shift as in the pipeline: sigma' = 3 sigma
    assert torch.allclose(d.shifted_sigmas(sigmas=[0.75, 0.5]), torch.tensor([9.0, 3.0, 0.0]), rtol=1e-5)


def test_dynamic_shift_grid_uses_mu_of_the_resolution():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from diffdistill.models.adapters.flow import DiffusersFlowDenoiser
    from diffdistill.testing.tiny_flow import tiny_sd3_transformer_config

    cfg = dict(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5, max_shift=1.15)
    d = DiffusersFlowDenoiser(SD3Transformer2DModel(**tiny_sd3_transformer_config()), cfg)
    mu = calculate_shift(16, 4, 64, 0.5, 1.15)  # 8x8 latent, patch 2: 16 tokens
    assert d.mu() == pytest.approx(mu) and d.shift() == pytest.approx(math.exp(mu))
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    ref.set_timesteps(4, mu=mu)
    u = ref.sigmas[1:].double()
    assert torch.allclose(d.shifted_sigmas(4)[1:].double(), u / (1 - u), rtol=1e-5)


def test_stock_pipeline_samples_from_the_tiny_folder(pipe):
    out = pipe("low", num_inference_steps=2, height=16, width=16, guidance_scale=3.0, output_type="pt").images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    assert pipe.scheduler.config.shift == 3.0 and pipe.transformer.config.in_channels == 16


def test_prompt_encoder_matches_the_pipeline_encode_prompt(teacher, pipe, cond):
    pe, npe, pp, npp = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    assert torch.equal(cond.prompt_embeds, pe.detach()) and torch.equal(cond.pooled_prompt_embeds, pp.detach())
    null = teacher.null_prompt
    assert torch.allclose(null.prompt_embeds, npe[:1], atol=1e-6), (null.prompt_embeds - npe[:1]).abs().max()
    assert torch.allclose(null.pooled_prompt_embeds, npp[:1], atol=1e-6)
    assert cond.prompt_embeds.shape == (2, 77 + 256, 64)


def test_prompt_encoder_disk_cache_and_negative_prompts(folder, cond, tmp_path):
    from diffdistill.models.adapters.sd3 import SD3PromptEncoder

    first = SD3PromptEncoder.from_pretrained(folder, cache_dir=tmp_path)
    assert first.kind == "sd3" and len(first.text_encoders) == 2  # no T5 in the tiny folder
    first.encode(PROMPTS)
    second = SD3PromptEncoder.from_pretrained(folder, cache_dir=tmp_path, cache_size=0)
    second._encode_uncached = None  # every prompt must come from the disk cache
    got = second.encode(PROMPTS, negative_prompts="low")
    assert torch.equal(got.prompt_embeds, cond.prompt_embeds)
    assert torch.equal(got.negative_prompt_embeds[1], cond.prompt_embeds[0])


def test_cfg_with_prompts_follows_the_guidance_scale(teacher, cond):
    x, sigma = _latents(2) * 2.0, torch.tensor([1.0, 1.0])
    with torch.no_grad():
        x0_c = teacher(x, sigma, cond, guidance_scale=1.0)
        x0_u = teacher.denoiser(x, sigma, Conditioning(**{k: v for k, v in vars(teacher.null_prompt).items()}))
        x0_3 = teacher(x, sigma, cond, guidance_scale=3.0)
        x0_5 = teacher(x, sigma, cond, guidance_scale=5.0)
    assert (x0_3 - x0_c).abs().max() > 1e-3 and (x0_5 - x0_3).abs().max() > 1e-3
    assert torch.allclose(x0_3, x0_u + 3.0 * (x0_c - x0_u), atol=1e-5)
    # a negative prompt replaces the empty prompt on the unconditional side
    neg = teacher.prompt_encoder.encode(["lower", "lower"])
    with_neg = Conditioning(
        prompt_embeds=cond.prompt_embeds,
        pooled_prompt_embeds=cond.pooled_prompt_embeds,
        negative_prompt_embeds=neg.prompt_embeds,
        negative_pooled_prompt_embeds=neg.pooled_prompt_embeds,
    )
    with torch.no_grad():
        x0_n = teacher(x, sigma, with_neg, guidance_scale=3.0)
        x0_nu = teacher.denoiser(x, sigma, neg)
    assert torch.allclose(x0_n, x0_nu + 3.0 * (x0_c - x0_nu), atol=1e-5)


def test_diffdistill_sampler_reproduces_the_stock_pipeline(folder, pipe, cond):
    from diffdistill.models.adapters.sd3 import sd3_teacher
    from diffdistill.sampling import euler_sample

    guided = sd3_teacher(folder, guidance_scale=3.0)
    pe, npe, pp, npp = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    z, u_grid = _latents(3), [0.9, 0.6, 0.3]
    ref = pipe(
        prompt_embeds=pe,
        pooled_prompt_embeds=pp,
        negative_prompt_embeds=npe,
        negative_pooled_prompt_embeds=npp,
        latents=z.clone(),
        sigmas=u_grid,
        guidance_scale=3.0,
        height=16,
        width=16,
        output_type="latent",
    ).images
    sigmas = guided.denoiser.shifted_sigmas(sigmas=u_grid)
    ours = euler_sample(guided, guided.prior_std(sigmas[0]) * z, sigmas, cond)
    assert torch.allclose(ours, ref, atol=1e-4)


def test_pipeline_sigmas_make_the_stock_pipeline_step_through_a_student_grid(teacher, pipe, cond):
    """A few-step grid from sigma_max (one native step below the pipeline's u = 1) reproduces in the pipeline."""
    from diffdistill.sampling import euler_sample

    d = teacher.denoiser
    grid = torch.tensor([d.sigma_max, 2.0, 0.3, 0.0])
    pe, _, pp, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    z = _latents(6)
    ref = pipe(
        prompt_embeds=pe,
        pooled_prompt_embeds=pp,
        latents=z.clone(),
        sigmas=d.pipeline_sigmas(grid),
        guidance_scale=1.0,
        height=16,
        width=16,
        output_type="latent",
    ).images
    assert torch.allclose(d.shifted_sigmas(sigmas=d.pipeline_sigmas(grid)), grid, rtol=1e-4)
    ours = euler_sample(d, d.prior_std(grid[0]) * z, grid, cond)
    assert torch.allclose(ours, ref, atol=1e-4)


def test_save_load_round_trip(teacher, cond, tmp_path):
    from diffdistill.models.io import load_model, model_config, save_model

    d = teacher.denoiser
    save_model(d, model_config(d), tmp_path / "flow")
    loaded = load_model(tmp_path / "flow")
    assert type(loaded) is type(d) and loaded.scheduler_config == d.scheduler_config
    assert torch.equal(loaded.null_prompt_embeds, d.null_prompt_embeds)
    x, sigma = _latents(4), torch.tensor([0.3, 7.0])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, cond), d(x, sigma, cond))
        assert torch.equal(loaded(x, sigma), d(x, sigma))  # no prompt: the null prompt
    assert loaded.sigma_max == d.sigma_max and loaded.feature_blocks == d.feature_blocks


def test_features_are_maps_of_the_tapped_blocks(teacher, cond):
    d = teacher.denoiser
    with torch.no_grad():
        taps = d.features(_latents(), torch.tensor([1.0, 2.0]), cond)
    assert d.feature_blocks == [0, 1]
    assert [tuple(t.shape) for t in taps] == [(2, 16, 4, 4)] * 2


def test_latent_codec_matches_the_pipeline_vae(teacher, pipe):
    codec = teacher.latent
    z = _latents(5, batch=1)
    with torch.no_grad():
        ref = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
        img = codec.decode(z)
        lat = codec.encode(img)
    assert torch.allclose(img, ref, atol=1e-6)
    assert lat.shape == (1, 16, 8, 8) and codec.latent_shape((3, 16, 16)) == (16, 8, 8)
    assert codec.image_shape((16, 8, 8)) == (3, 16, 16)


def test_missing_prompt_without_null_prompt_is_a_clear_error():
    from diffusers import SD3Transformer2DModel

    from diffdistill.models.adapters.flow import DiffusersFlowDenoiser
    from diffdistill.testing.tiny_flow import tiny_sd3_transformer_config

    d = DiffusersFlowDenoiser(SD3Transformer2DModel(**tiny_sd3_transformer_config()), {"shift": 3.0})
    assert d.null_prompt is None
    with pytest.raises(ValueError, match="prompt_embeds"):
        d(_latents(), torch.tensor([1.0, 1.0]))


def test_sd3_backbone_config_composes_and_builds(folder):
    from hydra.utils import instantiate

    from tests.helpers import compose_train

    cfg = compose_train(["~experiment", "backbone=sd3", f"backbone.path={folder}", "data=synthetic", "trainer=tiny"])
    teacher = instantiate(cfg.backbone)
    assert teacher.denoiser.shift() == 3.0 and teacher.null_prompt is not None
    assert teacher.latent.scaling_factor == pytest.approx(1.5305)
    assert teacher.prompt_encoder.encode(["low"]).prompt_embeds.shape == (1, 333, 64)


# ---------------------------------------------------------------------------------------------
# Flux-shaped transformer (packed 2x2 latents, img_ids / txt_ids, embedded guidance)


def _tiny_flux(guidance_embeds: bool = True):
    from diffusers import FluxTransformer2DModel

    from diffdistill.models.adapters.flow import DiffusersFluxDenoiser

    torch.manual_seed(0)
    net = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=24,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    sched = dict(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5, max_shift=1.15)
    return DiffusersFluxDenoiser(net, sched, sample_size=8, embedded_guidance=3.5)


def test_flux_adapter_packs_as_the_flux_pipeline(tmp_path):
    from diffusers import FluxPipeline

    from diffdistill.models.io import load_model, model_config, save_model

    d = _tiny_flux()
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 24, generator=g)
    cond = Conditioning(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    x, sigma = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.5, 3.0])
    u = sigma / (1 + sigma)
    x_rf = x * (1 - u)[:, None, None, None]
    assert d.sample_shape == (4, 8, 8) and d.image_seq_len() == 16
    with torch.no_grad():
        v = d.transformer(  # the call of pipeline_flux.py's denoising loop
            hidden_states=FluxPipeline._pack_latents(x_rf, 2, 4, 8, 8),
            timestep=u,
            guidance=torch.full((2,), 3.5),
            pooled_projections=cond.pooled_prompt_embeds,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=torch.zeros(5, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
        ).sample
        v = FluxPipeline._unpack_latents(v, 16, 16, 2)  # 16 px at VAE factor 2 = 8 latents
        x0 = d(x, sigma, cond)
        x0_g = d(x, sigma, Conditioning(**{**vars(cond), "guidance_scale": torch.tensor([1.0, 6.0])}))
        taps = d.features(x, sigma, cond)
    assert torch.allclose(x0, x_rf - u[:, None, None, None] * v, atol=1e-6)
    assert (x0_g - x0).abs().max() > 1e-4  # the embedded guidance reaches the network
    assert [tuple(t.shape) for t in taps] == [(2, 16, 4, 4)] * len(d.feature_blocks)
    save_model(d, model_config(d), tmp_path / "flux")
    loaded = load_model(tmp_path / "flux")
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, cond), x0)
    assert loaded.shift() == pytest.approx(d.shift()) and loaded.sample_shape == d.sample_shape


def test_student_from_the_flow_teacher_starts_from_unit_noise_and_reloads(teacher, cond, tmp_path):
    from diffdistill.models.generator import Generator
    from diffdistill.models.io import load_generator, model_config, save_model
    from diffdistill.models.lora import add_lora

    gen = Generator.from_teacher(teacher, sigma_init=teacher.sigma_max)
    add_lora(gen.denoiser, rank=2)
    z = _latents(7)
    x_in = gen.noise_input(z, gen.sigma_init)
    assert torch.allclose(x_in / (1 + gen.sigma_init), z, atol=1e-5)  # x_rf = z, as the pipeline starts
    save_model(gen, model_config(gen), tmp_path / "gen")
    with torch.no_grad():
        assert torch.equal(load_generator(tmp_path / "gen")(z, cond), gen(z, cond))


def test_sd3_teacher_refuses_another_pipeline_kind(tmp_path):
    """An SD pipeline given to ``backbone=sd3`` fails naming the kind and the backbone to use."""
    from diffdistill.models.adapters.sd3 import sd3_teacher
    from diffdistill.models.text import pipeline_kind
    from diffdistill.testing.tiny_flow import tiny_sd3_pipeline
    from diffdistill.testing.tiny_t2i import tiny_sd_pipeline

    sd = tiny_sd_pipeline(tmp_path / "sd", kind="sd")
    with pytest.raises(ValueError, match="'sd' pipeline; sd3_teacher loads SD3 pipelines"):
        sd3_teacher(sd)
    assert pipeline_kind(tiny_sd3_pipeline(tmp_path / "sd3")) == "sd3"  # no T5: the class name tells
