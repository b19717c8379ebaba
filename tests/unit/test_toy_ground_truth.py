"""Toy ground truth: sigma_data-aware noise densities, mixtures of any shape, roles for the exact teacher."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from diffdistill.conventions import noise_scale
from diffdistill.data import GaussianMixtureToy
from diffdistill.models.analytic import GaussianDenoiser, GaussianMixtureDenoiser
from diffdistill.models.builders import edm_mlp
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.generator import Generator
from diffdistill.models.teacher import Teacher
from diffdistill.objectives.consistency import ConsistencyDistillation
from diffdistill.objectives.ect import ECT, ICT, ect_r, ict_pair_probs
from diffdistill.objectives.edm import EDMDenoising
from diffdistill.objectives.lcm import LCM
from diffdistill.objectives.rcm import RCM
from diffdistill.objectives.scm import SCM
from diffdistill.objectives.sid import SiD
from diffdistill.objectives.sim import SIM
from diffdistill.objectives.vsd import DiffInstruct
from diffdistill.schedules.karras import karras_sigmas

SD = 1.4177  # the project mixture's sigma_data
C = SD / 0.5


def _teacher(sigma_data: float) -> Teacher:
    return Teacher(GaussianDenoiser(torch.zeros(2), torch.full((2,), sigma_data), sigma_data=sigma_data))


def _student(sigma_data: float) -> Generator:
    torch.manual_seed(0)
    return Generator(edm_mlp(dim=2, hidden=16, depth=1, sigma_data=sigma_data))


def _build(cls, sigma_data: float, **kw):
    t, g = _teacher(sigma_data), _student(sigma_data)
    roles = {"teacher": t, "generator": g}
    if "fake_score" in cls.roles:
        from diffdistill.models.generator import FakeScore

        roles["fake_score"] = FakeScore(edm_mlp(dim=2, hidden=16, depth=1, sigma_data=sigma_data))
    return cls.create(**roles, **kw)


def test_noise_scale_is_sigma_data_over_one_half():
    assert noise_scale(0.5) == 1.0 and noise_scale(2.0) == 4.0 and noise_scale(3.0, match=False) == 1.0
    with pytest.raises(ValueError, match="sigma_data"):
        noise_scale(0.0)


# the papers' P_mean for sigma_data = 0.5, and where each objective keeps it
P_MEANS = [
    (ICT, -1.1, "P_mean"),
    (ECT, -1.1, "P_mean"),
    (SCM, -1.0, "P_mean"),
    (EDMDenoising, -1.2, None),
    (SiD, -1.2, "P_mean"),  # the fake-score loss's EDM density (SiDA inherits it)
    (SIM, -1.2, "P_mean"),
    (DiffInstruct, -1.2, "P_mean"),
]


@pytest.mark.parametrize("cls,paper,attr", P_MEANS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_log_normal_P_mean_is_the_papers_at_one_half_and_shifted_by_ln_c(cls, paper, attr):
    def p_mean(obj):
        return getattr(obj, attr) if attr else obj.sigma_sampler.P_mean

    assert p_mean(_build(cls, 0.5)) == paper  # exactly the paper's value
    assert p_mean(_build(cls, SD)) == pytest.approx(paper + math.log(SD / 0.5), abs=1e-12)
    assert p_mean(_build(cls, SD, match_sigma_data=False)) == paper


def test_rcm_passes_the_shift_to_its_scm_term():
    assert _build(RCM, 0.5).scm.P_mean == -0.8
    assert _build(RCM, SD).scm.P_mean == pytest.approx(-0.8 + math.log(C), abs=1e-12)


def test_scm_time_density_equals_the_papers_on_rescaled_data():
    """t = arctan(e^tau / sigma_d) has the same law at every sigma_data once P_mean is shifted: same seed, same t."""
    paper, ours = _build(SCM, 0.5), _build(SCM, SD)
    torch.manual_seed(3)
    t_paper = paper.sample_t(4096, "cpu")
    torch.manual_seed(3)
    t_ours = ours.sample_t(4096, "cpu")
    assert torch.allclose(t_paper, t_ours, atol=1e-6)
    unshifted = _build(SCM, SD, match_sigma_data=False)
    torch.manual_seed(3)
    assert (unshifted.sample_t(4096, "cpu") - t_paper).abs().max() > 0.1  # what the shift corrects


@pytest.mark.parametrize("cls", [ConsistencyDistillation, ICT, LCM], ids=lambda c: c.__name__)
def test_sigma_ranges_scale_by_c_and_the_boundary_follows(cls):
    kw = {"distance": "l2"} if cls is not ICT else {}
    if cls is LCM:
        kw.update(num_scales=100, skipping_step=5)
    at_half, scaled = _build(cls, 0.5, **kw), _build(cls, SD, **kw)
    assert at_half.sigma_min == pytest.approx(0.002, rel=1e-6) and at_half.sigma_max == pytest.approx(80.0, rel=1e-6)
    assert scaled.sigma_min == pytest.approx(0.002 * C, rel=1e-6)
    assert scaled.sigma_max == pytest.approx(80.0 * C, rel=1e-6)
    assert scaled.generator.renoise_floor == pytest.approx(0.002 * C, rel=1e-6)  # the boundary condition's sigma


def test_ict_pair_probabilities_are_the_papers_on_the_scaled_grid():
    grid = karras_sigmas(41, 0.002, 80.0, 7.0).flip(0)
    p_paper = ict_pair_probs(grid, -1.1, 2.0)
    obj = _build(ICT, SD)
    p_ours = ict_pair_probs(grid * C, obj.P_mean, obj.P_std)
    assert torch.allclose(p_paper, p_ours, atol=1e-10)


def test_ict_pseudo_huber_c_is_in_data_units():
    """The default c = 0.00054 sqrt(D) is the paper's for data at sigma_data 0.5: carried as c times it, so the
    pseudo-Huber distance of residuals scaled by c is exactly c times the paper's; a given huber_c is kept."""
    from diffdistill.objectives.common import pseudo_huber
    from diffdistill.objectives.consistency import default_huber_c

    x = torch.randn(64, 2)
    paper, ours = _build(ICT, 0.5), _build(ICT, SD)
    c_paper, c_ours = paper.pseudo_huber_c(x), ours.pseudo_huber_c(x)
    assert c_paper == default_huber_c(x) == pytest.approx(0.00054 * math.sqrt(2))
    assert c_ours == pytest.approx(C * c_paper)
    r = 0.01 * torch.randn(64, 2)  # residuals of the order of c, where the two forms differ most
    torch.testing.assert_close(pseudo_huber(C * r, c_ours), C * pseudo_huber(r, c_paper), rtol=1e-5, atol=0)
    assert _build(ICT, SD, match_sigma_data=False).pseudo_huber_c(x) == c_paper
    assert _build(ICT, SD, huber_c=1.0).pseudo_huber_c(x) == 1.0  # a given c is used as is
    # CD / LCM's pseudo_huber distance takes the same data-unit default
    from diffdistill.objectives.consistency import consistency_distance

    cd = _build(ConsistencyDistillation, SD, distance="pseudo_huber")
    assert cd.noise_scale == pytest.approx(C)
    got = consistency_distance(r, torch.zeros_like(r), "pseudo_huber", None, None, cd.noise_scale)
    torch.testing.assert_close(got, pseudo_huber(r, c_ours), rtol=1e-6, atol=0)


def test_ect_r_of_t_is_the_papers_in_units_of_c():
    ours, paper = _build(ECT, SD), _build(ECT, 0.5)
    assert ours.noise_scale == pytest.approx(C) and paper.noise_scale == 1.0
    t = torch.logspace(-2, 1.5, 50)
    for step in (0, 3 * paper.double_every):  # r_ours(c t) = c r_paper(t): the same pairs, in the data's units
        assert torch.allclose(ours.r_of_t(C * t, step), C * paper.r_of_t(t, step), rtol=1e-5)
        assert torch.equal(paper.r_of_t(t, step), ect_r(t, paper.stage(step), 2.0, 8.0, 1.0, "sigmoid"))


# ------------------------------------------------------------------------------------------------ mixtures
def test_mixture_layouts_weights_and_sigma_data_closed_form():
    ds = GaussianMixtureToy(dim=3, num_components=4, layout="grid", radius=2.0, std=[0.1, 0.2, 0.3, 0.4],
                            weights=[4, 2, 1, 1])  # fmt: skip
    assert torch.allclose(ds.means[:, :2].mean(0), torch.zeros(2)) and (ds.means[:, 2] == 0).all()
    assert torch.allclose(ds.component_weights, torch.tensor([0.5, 0.25, 0.125, 0.125]))
    x = ds.exact_samples(200_000, torch.Generator().manual_seed(0))
    assert ds.sigma_data == pytest.approx(float(x.pow(2).mean().sqrt()), rel=5e-3)
    assert ds.teacher().sigma_data == pytest.approx(ds.sigma_data, rel=1e-6)
    batch = ds.get(torch.arange(100_000))  # the training stream draws components by weight
    near = torch.cdist(batch.x0, ds.means).argmin(1)
    assert (near == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="data.weights"):
        GaussianMixtureToy(num_components=3, weights=[1, 2])
    with pytest.raises(ValueError, match="data.layout"):
        GaussianMixtureToy(layout="spiral")


def test_the_default_mixture_stream_is_unchanged():
    """Uniform weights keep the label stream of earlier versions (saved runs resume identically)."""
    ds = GaussianMixtureToy()
    g = torch.Generator().manual_seed(ds.seed * 7919 + 5)
    labels = torch.randint(0, 8, (16,), generator=g)
    x = ds.means[labels] + 0.1 * torch.randn(16, 2, generator=g)
    assert torch.equal(ds.get(torch.arange(5, 21)).x0, x)


def test_unconditional_mixture_teacher_has_no_classes_and_ignores_labels():
    ds = GaussianMixtureToy()
    den = ds.teacher()
    assert den.num_classes is None and Teacher(den).num_classes is None
    x, s = torch.randn(8, 2), torch.full((8,), 0.5)
    assert torch.equal(den(x, s, Conditioning(class_labels=torch.zeros(8, dtype=torch.long))), den(x, s))
    cond = GaussianMixtureToy(conditional=True).teacher()
    assert cond.num_classes == 8
    assert not torch.allclose(cond(x, s, Conditioning(class_labels=torch.zeros(8, dtype=torch.long))), cond(x, s))


# ------------------------------------------------------------------------------------------------ guidance
def test_lcm_of_an_unconditional_teacher_embeds_no_guidance():
    ds = GaussianMixtureToy()
    gen = Generator(edm_mlp(dim=2, hidden=16, depth=1, sigma_data=ds.sigma_data))
    LCM.create(teacher=Teacher(ds.teacher()), generator=gen, num_scales=100, skipping_step=5, distance="l2")
    assert gen.guidance is None and not any("guidance" in k for k in gen.state_dict())


def test_lcm_of_a_conditional_teacher_records_its_range_and_samples_inside_it():
    ds = GaussianMixtureToy(conditional=True)
    gen = Generator(edm_mlp(dim=2, hidden=16, depth=1, num_classes=8, sigma_data=ds.sigma_data))
    LCM.create(teacher=Teacher(ds.teacher()), generator=gen, num_scales=100, skipping_step=5, distance="l2")
    assert gen.guidance == {"w_min": 3.0, "w_max": 15.0, "w_default": 9.0}
    seen = []
    emb = gen.denoiser.inner.net.guidance_emb
    hook = emb.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gen(torch.randn(4, 2))  # no scale given: the recorded default, inside the range, no warning
    assert torch.equal(seen[-1], torch.full((4,), 9.0))
    with pytest.warns(UserWarning, match="outside the range"):
        gen(torch.randn(4, 2), Conditioning(guidance_scale=torch.ones(4)))
    hook.remove()


# ------------------------------------------------------------------------------------------------ roles
def _roles(objective: str, student=None, fake=None):
    from diffdistill.training.builders import build_roles, objective_class
    from tests.helpers import compose_train

    over = ["~experiment", "backbone=analytic", "data=toy_gmm", f"objective={objective}"]
    over += [f"student/denoiser={student}"] if student else []
    over += [f"fake_score/denoiser={fake}"] if fake else []
    cfg = compose_train(over)
    teacher = Teacher(GaussianMixtureToy().teacher())
    cls = objective_class(cfg.objective)
    return build_roles(cls, teacher, cfg.student, {}, None, cfg.get("fake_score"))


def test_exact_teacher_roles_need_networks_and_the_error_names_the_key():
    with pytest.raises(ValueError, match=r"student\.denoiser=.*student/denoiser=toy_mlp"):
        _roles("dmd")
    with pytest.raises(ValueError, match=r"fake_score\.denoiser"):
        _roles("dmd", student="toy_mlp")
    roles = _roles("dmd", student="toy_mlp", fake="toy_mlp")
    assert roles["generator"].sigma_data == pytest.approx(GaussianMixtureToy().sigma_data, rel=1e-5)
    assert all(p.requires_grad for p in roles["fake_score"].parameters())


def test_fake_score_key_rejects_a_non_config():
    from diffdistill.training.builders import check_network_key

    with pytest.raises(ValueError, match="fake_score.denoiser must be null"):
        check_network_key(OmegaConf.create({"denoiser": 3}).denoiser, "fake_score.denoiser")


def test_fitted_network_is_deterministic_and_close_to_the_exact_denoiser():
    from diffdistill.models.fit import _CACHE, fit_to_teacher

    ds = GaussianMixtureToy()
    teacher = Teacher(ds.teacher())

    def net():
        torch.manual_seed(123)
        return edm_mlp(dim=2, hidden=32, depth=2, sigma_data=ds.sigma_data, fourier_scale=1.0)

    _CACHE.clear()
    before = net()
    a = fit_to_teacher(net(), teacher, steps=300, batch_size=256, lr=3e-3)
    _CACHE.clear()
    b = fit_to_teacher(net(), teacher, steps=300, batch_size=256, lr=3e-3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    x0, _ = ds.teacher().sample(2048, torch.Generator().manual_seed(9))
    sigma = torch.full((2048,), 0.5)
    x = x0 + 0.5 * torch.randn_like(x0)
    with torch.no_grad():
        exact = teacher(x, sigma)
        err_fit, err_init = (a(x, sigma) - exact).pow(2).mean(), (before(x, sigma) - exact).pow(2).mean()
    assert err_fit < 0.5 * err_init
    trained = Teacher(edm_mlp(dim=2, hidden=8, depth=1))  # a teacher with weights is copied, as usual
    copy = fit_to_teacher(net(), trained, steps=1)
    assert copy is not trained.denoiser and all(p.requires_grad for p in copy.parameters())
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), trained.denoiser.state_dict().values()))

    class Weightless(torch.nn.Module):
        sigma_data = 0.5

        def forward(self, x, sigma, cond=None):
            return x

    with pytest.raises(ValueError, match="exact sampler"):
        fit_to_teacher(net(), Teacher(Weightless()), steps=1)


def test_mixture_denoiser_config_round_trip_keeps_conditional():
    den = GaussianMixtureDenoiser(torch.randn(3, 2), 0.2, conditional=False)
    from hydra.utils import instantiate

    from diffdistill.models.io import model_config

    rebuilt = instantiate(OmegaConf.create(model_config(den)))
    assert rebuilt.num_classes is None and rebuilt.conditional is False


@pytest.mark.parametrize("cls", [SiD, SIM], ids=lambda c: c.__name__)
def test_score_identity_noise_levels_are_the_papers_in_units_of_c(cls):
    """SiD's / SIM's truncated Karras ramp of the generator loss, drawn on the same seed, is c times the paper's
    (a teacher at sigma_data = 0.5 with the same sigma range); the fake loss's log-normal is shifted by ln c."""
    paper, ours = _build(cls, 0.5), _build(cls, SD)
    torch.manual_seed(0)
    s_paper = paper.sample_sigmas(1000, "cpu")
    torch.manual_seed(0)
    s_ours = ours.sample_sigmas(1000, "cpu")
    torch.testing.assert_close(s_ours, C * s_paper, rtol=1e-5, atol=0)  # float32 ramp rounding
    torch.manual_seed(0)
    f_paper = paper.fake_sigmas(1000, "cpu") if hasattr(paper, "fake_sigmas") else None
    if f_paper is not None:
        torch.manual_seed(0)
        torch.testing.assert_close(ours.fake_sigmas(1000, "cpu"), C * f_paper, rtol=1e-5, atol=0)
