"""LCM on SD-family (VP discrete-time) students: LCM's own boundary scalings and guidance embedding, as diffusers has
them (``LCMScheduler``, ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``), checked against
diffusers on the same inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import LCMScheduler

from diffdistill.conventions import consistency_precond, edm_precond
from diffdistill.models.adapters import DiffusersVPDenoiser
from diffdistill.models.adapters.sd import guidance_scale_embedding, sd_teacher
from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.models.consistency import (
    ConsistencyDenoiser,
    LCMBoundaryDenoiser,
    discrete_vp_schedule,
    lcm_boundary_scalings,
)
from diffdistill.models.denoiser import EDMDenoiser
from diffdistill.models.generator import Generator
from diffdistill.models.io import build_from_config, model_config
from diffdistill.objectives.lcm import LCM
from diffdistill.testing.tiny_t2i import tiny_sd_pipeline
from tests.helpers import perturb, tiny_unet2d

TIMESTEPS = [0, 19, 499, 999]
TOL = dict(atol=1e-5, rtol=1e-5)  # fp32; x0 of a random UNet at t = 999 reaches ~50 (x = x_vp / alpha, 1/alpha = 14.6)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcm_sd")
    out = {}
    for pred in ("epsilon", "v_prediction"):
        out[pred] = sd_teacher(tiny_sd_pipeline(root / pred, prediction_type=pred), guidance_scale=3.0)
    return out


def _prompt_cond(teacher, w: float | None = None) -> Conditioning:
    cond = teacher.prompt_encoder.encode(["lower newer", "wider"])
    return cond if w is None else Conditioning(prompt_embeds=cond.prompt_embeds, guidance_scale=torch.full((2,), w))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_boundary_equals_lcm_scheduler(teachers, pred):
    """c_skip / c_out are LCMScheduler's at each timestep, and the student's output is its step's ``denoised``."""
    teacher = teachers[pred]
    den = LCMBoundaryDenoiser(perturb(copy.deepcopy(teacher.denoiser), 1))
    sched = LCMScheduler(beta_schedule="scaled_linear", prediction_type=pred, clip_sample=False)
    cond = _prompt_cond(teacher)
    for t in TIMESTEPS:
        abar = sched.alphas_cumprod[t]
        sigma = ((1 - abar) / abar).sqrt().float().repeat(2)
        c_skip, c_out, alpha = den.scalings(sigma)
        want_skip, want_out = sched.get_scalings_for_boundary_condition_discrete(t)
        # (a float32 sigma pins its timestep to ~2e-7 near t = 0, where c_out = 20 t)
        torch.testing.assert_close(c_skip, torch.full((2,), float(want_skip)), atol=1e-9, rtol=1e-4)
        torch.testing.assert_close(c_out, torch.full((2,), float(want_out)), atol=5e-6, rtol=1e-6)
        x_vp = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            out = den.inner.unet(x_vp, torch.tensor([t, t]), encoder_hidden_states=cond.prompt_embeds).sample
            sched.set_timesteps(timesteps=[t])
            want = sched.step(out, t, x_vp).denoised
            got = den(x_vp / abar.sqrt(), sigma, cond)  # the EDM view of the same point
        torch.testing.assert_close(got, want, **TOL)


def test_t19_is_x0_hat_not_song_boundary(teachers):
    """At t = 19 LCM's student is x0_hat (+ 7e-6 x_vp); Song et al.'s boundary at t = 0 was 0.227 x + 0.783 x0_hat."""
    den = teachers["epsilon"].denoiser
    sigma = den.schedule.sigmas[19].float().reshape(1)
    c_skip, c_out, alpha = LCMBoundaryDenoiser(den).scalings(sigma)
    assert float(c_skip * alpha) < 1e-5 and float(c_out) > 1 - 1e-5
    # the old wrapper: ConsistencyDenoiser(boundary sigma_0, sigma_data 0.5), F = (x0_hat - c_skip x) / c_out
    song_skip, song_out = consistency_precond(sigma, 0.5, float(den.schedule.sigmas[0]))
    edm_skip, edm_out, _, _ = edm_precond(sigma, 0.5)
    on_x, on_x0 = song_skip - song_out * edm_skip / edm_out, song_out / edm_out
    assert abs(float(on_x) - 0.227) < 1e-3 and abs(float(on_x0) - 0.783) < 1e-3  # the figures


def test_vp_pixel_adapter_matches_lcm_scheduler():
    """The existing DDPM pixel adapter gets the same scalings (linear-beta schedule, integer timesteps)."""
    torch.manual_seed(0)
    sched = LCMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    den = LCMBoundaryDenoiser(DiffusersVPDenoiser(tiny_unet2d(), sched.alphas_cumprod, quantize=True)).eval()
    for t in TIMESTEPS:
        abar = sched.alphas_cumprod[t]
        x_vp = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            sched.set_timesteps(timesteps=[t])
            want = sched.step(den.inner.unet(x_vp, torch.tensor([t, t])).sample, t, x_vp).denoised
            got = den(x_vp / abar.sqrt(), ((1 - abar) / abar).sqrt().float().repeat(2))
        # fp32 rounding of x = x_vp / alpha (1/alpha = 157 at t = 999 of the linear schedule) scales the error
        torch.testing.assert_close(got, want, atol=2e-6 / float(abar.sqrt()), rtol=1e-5)


def test_prepare_student_sd_lcm_boundary_and_guidance_embedding(teachers):
    """SD students get LCM's boundary and the UNet's own time_cond_proj_dim embedding of ``w - 1`` (= omega): with
    ``guidance_scale = omega + 1`` the student is the training script's ``c_skip x + c_out x0(unet(.., w_emb(omega)))``.
    The wrapper saves and loads as a model folder config."""
    teacher = teachers["epsilon"]
    gen = Generator(copy.deepcopy(teacher.denoiser).requires_grad_(True), teacher.sigma_max)
    LCM.prepare_student(gen, teacher=teacher, w_min=6.0, w_max=16.0)  # the script's omega in [5, 15]
    assert isinstance(gen.denoiser, LCMBoundaryDenoiser) and gen.renoise_floor == 0.0
    unet = gen.denoiser.inner.unet
    assert unet.config.time_cond_proj_dim == 256 and gen.guidance == {"w_min": 6.0, "w_max": 16.0, "w_default": 11.0}
    perturb(gen, 2)
    t, omega = 499, 7.0
    sched = LCMScheduler(beta_schedule="scaled_linear", clip_sample=False)
    abar = sched.alphas_cumprod[t]
    x_vp = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = _prompt_cond(teacher, omega + 1.0)
    with torch.no_grad():
        w_emb = guidance_scale_embedding(torch.full((2,), omega), 256)  # train_lcm_distill_sd_wds.py: embed(w)
        eps = unet(x_vp, torch.tensor([t, t]), encoder_hidden_states=cond.prompt_embeds, timestep_cond=w_emb).sample
        c_skip, c_out = lcm_boundary_scalings(torch.tensor(float(t)))
        want = c_skip * x_vp + c_out * (x_vp - (1 - abar).sqrt() * eps) / abar.sqrt()
        got = gen.denoise(x_vp / abar.sqrt(), ((1 - abar) / abar).sqrt().float(), cond)
        torch.testing.assert_close(got, want, **TOL)
        rebuilt = build_from_config(model_config(gen)).eval()
        rebuilt.load_state_dict(gen.state_dict())
        assert isinstance(rebuilt.denoiser, LCMBoundaryDenoiser)
        torch.testing.assert_close(rebuilt.denoise(x_vp / abar.sqrt(), ((1 - abar) / abar).sqrt().float(), cond), got)


def test_prepare_student_keeps_song_boundary_for_edm():
    from diffdistill.models.backbones import UNetBackbone
    from tests.helpers import tiny_unet2d_config

    gen = Generator(EDMDenoiser(UNetBackbone(tiny_unet2d_config(), num_classes=None)), 80.0)
    LCM.prepare_student(gen, teacher=None, embed_guidance=False)
    assert type(gen.denoiser) is ConsistencyDenoiser and discrete_vp_schedule(gen) is None
    with pytest.raises(ValueError, match="VP discrete-time adapter"):
        LCMBoundaryDenoiser(gen.denoiser.inner)


def test_lcm_objective_on_sd_teacher_uses_its_timesteps(teachers):
    """No schedule given: LCM distils on the SD teacher's own 1000 timesteps (skipping pairs t -> t - 20)."""
    teacher = teachers["epsilon"]
    gen = Generator(copy.deepcopy(teacher.denoiser).requires_grad_(True), teacher.sigma_max)
    obj = LCM.create(teacher=teacher, generator=gen)
    assert torch.equal(obj.sigmas_asc, teacher.denoiser.schedule.sigmas.float())
    assert obj.start_index[0] == 999 and obj.target_index[-1] == 0
    cond = _prompt_cond(teacher)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    out = obj.generator_loss(Batch(x0, cond), 0)
    assert out.loss.shape == (2,) and torch.isfinite(out.loss).all()


def test_lognormal_noise_levels_stay_inside_a_ddpm_students_range(teachers):
    """ECT's and sCM's log-normal sigmas (P_std 2.0 / 1.4 reach far past SD's [0.029, 14.6]) are clamped to a DDPM
    student's range, so its timestep and input noise agree; an EDM student's draws are the paper's, unchanged."""
    from diffdistill.objectives.ect import ECT
    from diffdistill.objectives.scm import SCM

    teacher = teachers["epsilon"]
    sched = discrete_vp_schedule(teacher)
    lo, hi = float(sched.sigmas.min()), float(sched.sigmas.max())
    gen = Generator(copy.deepcopy(teacher.denoiser), teacher.sigma_max)
    for obj in (SCM(None, gen, mode="sct", adaptive_weighting=False), ECT(gen)):
        assert obj.sigma_range == pytest.approx((lo, hi))
    from diffdistill.models.generator import FakeScore
    from diffdistill.objectives.sid import SiD

    sid = SiD(teacher, gen, FakeScore.from_teacher(teacher))  # SD's sigma_data 1: P_mean -1.2 + ln 2
    torch.manual_seed(0)
    fake_sigma = sid.fake_sigmas(4000, "cpu")
    assert float(fake_sigma.max()) <= hi * (1 + 1e-5) and float(fake_sigma.min()) >= lo * (1 - 1e-5)
    scm = SCM(None, gen, mode="sct", adaptive_weighting=False)
    torch.manual_seed(0)
    sigma = scm.sigma_data * torch.tan(scm.sample_t(4000, "cpu"))
    assert float(sigma.min()) >= lo * (1 - 1e-5) and float(sigma.max()) <= hi * (1 + 1e-5)
    assert (sigma > hi * 0.999).any() and (sigma < lo * 1.001).any()  # the law does reach both ends
    edm = Generator(EDMDenoiser(tiny_unet2d()), 80.0)
    plain = SCM(None, edm, mode="sct", adaptive_weighting=False)
    assert plain.sigma_range is None
    torch.manual_seed(0)
    t = plain.sample_t(4000, "cpu")
    torch.manual_seed(0)
    tau = plain.P_mean + plain.P_std * torch.randn(4000)
    torch.testing.assert_close(t, torch.atan(tau.exp() / plain.sigma_data), rtol=0, atol=0)
