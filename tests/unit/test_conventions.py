import math

import pytest
import torch

from diffdistill import conventions as C
from diffdistill.schedules import DDPMSchedule, KarrasSchedule, LogNormalSigma, LogUniformSigma, karras_sigmas
from diffdistill.schedules.flow import flow_shift, flow_unshift, sigma_to_u, u_to_sigma

torch.manual_seed(0)


def test_append_dims_and_as_sigma():
    assert C.append_dims(torch.ones(3), 4).shape == (3, 1, 1, 1)
    s = C.as_sigma(0.5, 4)
    assert s.shape == (4,) and s.dtype == torch.float32
    with pytest.raises(ValueError, match="entries"):
        C.as_sigma(torch.ones(3), 4)


def test_edm_precond_closed_form():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = C.edm_precond(torch.tensor([sd]), sd)
    assert torch.allclose(c_skip, torch.tensor([0.5]))
    assert torch.allclose(c_out, torch.tensor([sd / math.sqrt(2)]))
    assert torch.allclose(c_in, torch.tensor([1 / (sd * math.sqrt(2))]))
    assert torch.allclose(c_noise, torch.tensor([math.log(sd) / 4]))
    # EDM's design rule: the network target (x0 - c_skip x) / c_out has unit variance for data of std sigma_d
    sigma = torch.tensor([0.01, 0.3, 2.0, 80.0])
    c_skip, c_out, c_in, _ = C.edm_precond(sigma, sd)
    var_target = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2
    assert torch.allclose(var_target, torch.ones(4), atol=1e-4)
    assert torch.allclose(c_in**2 * (sigma**2 + sd**2), torch.ones(4))


@pytest.mark.parametrize("shape", [(4, 3), (4, 1, 5, 5)])
def test_prediction_space_round_trips(shape):
    x0, eps = torch.randn(shape), torch.randn(shape)
    sigma = torch.rand(shape[0]) * 5 + 0.1
    x = x0 + C.append_dims(sigma, len(shape)) * eps
    assert torch.allclose(C.eps_to_x0(x, eps, sigma), x0, atol=1e-5)
    assert torch.allclose(C.x0_to_eps(x, x0, sigma), eps, atol=1e-4)
    score = C.score_from_x0(x, x0, sigma)
    assert torch.allclose(score, -eps / C.append_dims(sigma, len(shape)), atol=1e-4)
    assert torch.allclose(C.x0_from_score(x, score, sigma), x0, atol=1e-4)


def test_vp_round_trip_and_v_prediction():
    x0, eps = torch.randn(6, 3), torch.randn(6, 3)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 50.0])
    x = x0 + sigma[:, None] * eps
    x_vp, alpha, s = C.edm_to_vp(x, sigma)
    assert torch.allclose(alpha**2 + s**2, torch.ones(6))
    assert torch.allclose(x_vp, alpha[:, None] * x0 + s[:, None] * eps, atol=1e-5)
    x_back, sigma_back = C.vp_to_edm(x_vp, alpha, s)
    assert torch.allclose(x_back, x, atol=1e-4) and torch.allclose(sigma_back, sigma, rtol=1e-5)
    v = alpha[:, None] * eps - s[:, None] * x0  # Salimans & Ho v-target
    assert torch.allclose(C.v_to_x0(x_vp, v, alpha, s), x0, atol=1e-5)
    assert torch.allclose(C.x0_to_v(x_vp, x0, alpha, s), v, atol=1e-3)


def test_rectified_flow_and_trigflow_round_trips():
    x0, eps = torch.randn(5, 4), torch.randn(5, 4)
    u = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95])
    x_rf = (1 - u[:, None]) * x0 + u[:, None] * eps
    x, sigma = C.rf_to_edm(x_rf, u)
    assert torch.allclose(x, x0 + sigma[:, None] * eps, atol=1e-5)
    x_rf2, u2 = C.edm_to_rf(x, sigma)
    assert torch.allclose(x_rf2, x_rf, atol=1e-5) and torch.allclose(u2, u, atol=1e-6)
    v = eps - x0
    assert torch.allclose(C.flow_to_x0(x_rf, v, u), x0, atol=1e-5)
    assert torch.allclose(C.x0_to_flow(x_rf, x0, u), v, atol=1e-4)
    sd = 0.5
    t = torch.tensor([0.1, 0.4, 0.8, 1.2, 1.5])
    z = sd * eps
    x_trig = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
    x_e, sigma_e = C.trig_to_edm(x_trig, t, sd)
    assert torch.allclose(x_e, x0 + sigma_e[:, None] * eps, atol=1e-4)
    x_t2, t2 = C.edm_to_trig(x_e, sigma_e, sd)
    assert torch.allclose(x_t2, x_trig, atol=1e-5) and torch.allclose(t2, t, atol=1e-6)
    F = (torch.cos(t)[:, None] * z - torch.sin(t)[:, None] * x0) / sd  # conditional TrigFlow velocity / sigma_d
    assert torch.allclose(C.trigflow_F_to_x0(x_trig, F, t, sd), x0, atol=1e-5)
    assert torch.allclose(C.x0_to_trigflow_F(x_trig, x0, t, sd), F, atol=1e-4)


def test_cfg_same_in_every_affine_space():
    x = torch.randn(4, 3)
    sigma = torch.rand(4) + 0.5
    x0_c, x0_u = torch.randn(4, 3), torch.randn(4, 3)
    w = 3.0
    x0_cfg = C.cfg_combine(x0_u, x0_c, w)
    eps_cfg = C.cfg_combine(C.x0_to_eps(x, x0_u, sigma), C.x0_to_eps(x, x0_c, sigma), w)
    assert torch.allclose(C.eps_to_x0(x, eps_cfg, sigma), x0_cfg, atol=1e-5)
    assert torch.allclose(C.cfg_combine(x0_u, x0_c, 1.0), x0_c, atol=1e-6)


def test_karras_grid():
    s = karras_sigmas(18)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002, rel=1e-5)
    assert (s[1:] < s[:-1]).all()
    i = 5
    expect = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expect, rel=1e-5)
    asc = KarrasSchedule().sigmas(ascending=True)
    # DMD2's ascending 1000-level grid (tianweiy/DMD2, main/edm/edm_guidance.py)
    assert asc[20].item() == pytest.approx(0.0032, abs=1e-4)
    assert asc[980].item() == pytest.approx(72.05, abs=0.05)
    assert karras_sigmas(3, append_zero=True)[-1] == 0


def test_sigma_densities():
    g = torch.Generator().manual_seed(0)
    s = LogNormalSigma(-1.2, 1.2)(200_000, generator=g)
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.01)
    u = LogUniformSigma(0.01, 10.0)(200_000, generator=g)
    assert u.min() >= 0.01 and u.max() <= 10.0
    assert u.log().mean().item() == pytest.approx((math.log(0.01) + math.log(10)) / 2, abs=0.02)
    # log_prob integrates to ~1
    grid = torch.logspace(-4, 3, 200_001)
    for d in (LogNormalSigma(), LogUniformSigma(0.01, 10.0)):
        p = d.log_prob(grid).exp()
        if isinstance(d, LogUniformSigma):
            p = torch.where((grid >= 0.01) & (grid <= 10.0), p, torch.zeros_like(p))
        assert torch.trapezoid(p, grid).item() == pytest.approx(1.0, abs=2e-3)


def test_ddpm_schedule_round_trip_and_quantisation():
    sch = DDPMSchedule.scaled_linear()
    t = torch.tensor([0.0, 1.6, 250.0, 999.0])
    sigma = sch.t_to_sigma(t)
    assert torch.allclose(sch.sigma_to_t(sigma), t, atol=1e-3)
    ac = sch.alphas_cumprod
    assert sigma[0].item() == pytest.approx(((1 - ac[0]) / ac[0]).sqrt().item(), rel=1e-5)
    assert sch.sigma_max == pytest.approx(((1 - ac[-1]) / ac[-1]).sqrt().item())
    q = DDPMSchedule.scaled_linear(quantize=True)
    assert torch.equal(q.sigma_to_t(sigma), torch.tensor([0.0, 2.0, 250.0, 999.0]))
    alpha, s = sch.alpha_sigma(sigma)
    assert torch.allclose(alpha[[0, 2, 3]] ** 2, ac[[0, 250, 999]].float(), rtol=1e-4)
    with pytest.raises(ValueError):
        DDPMSchedule(torch.tensor([0.5, 0.9]))


def test_flow_time_and_shift():
    u = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(sigma_to_u(u_to_sigma(u)), u, atol=1e-6)
    assert torch.allclose(flow_unshift(flow_shift(u, 3.0), 3.0), u, atol=1e-6)
    assert torch.equal(flow_shift(u, 1.0), u)
    assert (flow_shift(u, 3.0) >= u).all()  # shift > 1 moves time towards noise


def test_sd_schedule_and_timestep_resolver_match_diffusers_exactly():
    """``DDPMSchedule.scaled_linear`` is diffusers' SD schedule bit for bit, and ``${dd.sd_sigmas:...}`` gives sigmas
    that map back to integer timesteps (what the stock ``LCMScheduler`` export needs)."""
    from diffusers import DDPMScheduler

    from diffdistill.utils.resolvers import sd_sigmas

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(DDPMSchedule.scaled_linear().alphas_cumprod, ref.alphas_cumprod.double())
    sigmas = sd_sigmas(999, 749, 499, 249)
    ac = ref.alphas_cumprod.double()
    assert sigmas[0] == float(((1 - ac[999]) / ac[999]).sqrt())
    assert torch.equal(
        DDPMSchedule(ref.alphas_cumprod).sigma_to_t(torch.tensor(sigmas, dtype=torch.float64)),
        torch.tensor([999.0, 749.0, 499.0, 249.0]),
    )
    assert sd_sigmas(999) == sigmas[0]  # one timestep: one float (student.sigma_init)
    with pytest.raises(ValueError, match="integer timesteps"):
        sd_sigmas(1000)
