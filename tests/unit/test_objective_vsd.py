"""VSD / SwiftBrush (LoRA fake score on the teacher's shared base) and Diff-Instruct (unnormalised sigma^2-weighted
KL gradient, lognormal sigma) on the Gaussian toy and the tiny UNet (docs/invariants.md §5)."""

import math

import pytest
import torch

from diffdistill.models import Conditioning, FakeScore, GaussianDenoiser, Generator, Teacher
from diffdistill.models.analytic import AffineDenoiser
from diffdistill.models.conditioning import Batch
from diffdistill.models.lora import SharedBaseDenoiser
from diffdistill.objectives.vsd import VSD, DiffInstruct, fake_lora_spec, lora_fake_score
from diffdistill.training.builders import build_experiment, build_trainer
from tests.helpers import TINY, compose_train

MU, S = 0.3, 0.8
A0, B0, SIGMA = 0.5, -0.2, 0.7


def gaussian_roles(dim, a=A0, b=B0):
    teacher = Teacher(GaussianDenoiser(torch.full((dim,), MU), torch.full((dim,), S)))
    gen = Generator(AffineDenoiser(dim, a, b), sigma_init=1.0)
    fake = FakeScore(GaussianDenoiser(torch.full((dim,), b), torch.full((dim,), abs(a)), trainable=True))
    return teacher, gen, fake


def kl_gradient(a=A0, b=B0, sigma=SIGMA):
    """grad_(a, b) KL(q_sigma || p_sigma) of x = a z + b against N(MU, S^2) (docs/invariants.md §1)."""
    R, A = S**2 + sigma**2, a**2 + sigma**2
    return a * (1 / R - 1 / A), (b - MU) / R


# ------------------------------------------------------------------------------------------ VSD


def test_vsd_fake_score_is_a_lora_on_the_teachers_own_network(tmp_path):
    """One copy of the base: the fake score's frozen weights are the tensors the teacher runs; only the adapters
    train; the teacher's view ignores them; the student is a separate full copy."""
    exp = build_experiment(compose_train(["objective=vsd", *TINY, f"run_dir={tmp_path}"]))
    fake, teacher, gen = exp.roles["fake_score"], exp.teacher, exp.roles["generator"]
    assert isinstance(teacher.denoiser, SharedBaseDenoiser) and teacher.denoiser.shared is fake.denoiser
    trainable = [n for n, p in fake.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = {p.data_ptr() for n, p in fake.named_parameters() if "lora_" not in n}
    assert not base & {p.data_ptr() for p in gen.parameters()}
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 1.5)
    cond = Conditioning(class_labels=torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        t0, f0 = teacher(x, sigma, cond), fake(x, sigma, cond)
        assert torch.allclose(t0, f0, atol=1e-6)  # LoRA B = 0: the fake score starts as the teacher
        for n, p in fake.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
        assert torch.equal(teacher(x, sigma, cond), t0) and not torch.allclose(fake(x, sigma, cond), f0)


def test_vsd_trains_only_the_adapters_and_keeps_the_teacher(tmp_path):
    overrides = ["objective=vsd", *TINY, f"run_dir={tmp_path}", "logger=none", "optim.lr=1e-3", "optim.warmup_steps=0"]
    trainer = build_trainer(compose_train(overrides))
    fake = trainer.roles["fake_score"]
    before = {n: p.detach().clone() for n, p in fake.named_parameters()}
    micro = trainer._micro_batches()
    trainer._set_trainable(trainer.critic_roles)
    logs = trainer._update(trainer.critic_roles, "critic", lambda b: trainer.objective.critic_loss(b, 0), micro)
    assert logs["fake_score_grad_norm"] > 0
    changed = {n for n, p in fake.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_vsd_lora_goes_on_the_configured_network_with_an_analytic_teacher(tmp_path):
    """experiment=toy_gmm/vsd: the exact teacher has no weights; the adapters sit on fake_score.denoiser."""
    overrides = ["experiment=toy_gmm/vsd", f"run_dir={tmp_path}", "trainer.device=cpu"]
    overrides += ["student.denoiser.steps=5", "fake_score.denoiser.steps=5"]  # the fit itself is not under test
    exp = build_experiment(compose_train(overrides))
    fake = exp.roles["fake_score"]
    assert not isinstance(exp.teacher.denoiser, SharedBaseDenoiser)
    assert fake.denoiser.lora_spec["adapter_name"] == "fake_score"
    assert all("lora_" in n for n, p in fake.named_parameters() if p.requires_grad)


def test_vsd_lora_without_a_base_network_names_the_key():
    teacher = Teacher(GaussianDenoiser(torch.zeros(2), torch.ones(2)))
    with pytest.raises(ValueError, match="fake_score.denoiser"):
        lora_fake_score(teacher, None, fake_lora_spec(None))
    with pytest.raises(ValueError, match="fake_lora.rank"):
        fake_lora_spec({"rank": 0})
    with pytest.raises(ValueError, match="unknown keys"):
        fake_lora_spec({"ranks": 4})


def test_vsd_with_a_base_sharing_lora_student_says_what_to_change(tmp_path):
    base = ["objective=vsd", *TINY, f"run_dir={tmp_path}", "+student.lora.rank=4"]
    with pytest.raises(ValueError, match="share_base=false"):
        build_experiment(compose_train(base))
    exp = build_experiment(compose_train([*base, "objective.fake_lora.share_base=false"]))
    fake_base = {p.data_ptr() for n, p in exp.roles["fake_score"].named_parameters() if "lora_" not in n}
    assert not fake_base & {p.data_ptr() for p in exp.roles["generator"].parameters()}


@pytest.mark.parametrize("weighting", ["unit", "vp"])
def test_vsd_gradient_is_omega_times_the_eps_difference(weighting):
    """g = omega (eps_real - eps_fake) = omega sigma (s_fake - s_real) (docs/invariants.md §5, VSD)."""
    teacher, gen, fake = gaussian_roles(4)
    obj = VSD(teacher, gen, fake, weighting=weighting)
    x = gen(torch.randn(6, 4)).detach()
    sigma = torch.tensor([0.05, 0.3, 1.0, 2.0, 10.0, 70.0])
    x_t = x + sigma[:, None] * torch.randn_like(x)
    g = obj.dm_gradient(x, x_t, sigma, Conditioning(), teacher(x_t, sigma), fake(x_t, sigma))
    s = sigma[:, None]
    s_real, s_fake = -(x_t - MU) / (S**2 + s**2), -(x_t - B0) / (A0**2 + s**2)
    omega = s**2 / (1 + s**2) if weighting == "vp" else torch.ones_like(s)
    assert torch.allclose(g, omega * s * (s_fake - s_real), rtol=1e-4, atol=1e-6)


def test_vsd_unit_weighting_gives_the_kl_gradient():
    """E[g / sigma * dx/dtheta] = grad KL(q_sigma || p_sigma) at a fixed sigma (closed form -0.2332 / -0.4425)."""
    n = 400_000
    torch.manual_seed(0)
    teacher, gen, fake = gaussian_roles(1)
    obj = VSD(teacher, gen, fake, weighting="unit")
    obj.dm_sigmas = lambda k, device: torch.full((k,), SIGMA, device=device)
    out = obj.generator_loss(Batch(torch.zeros(n, 1), Conditioning()), 0)
    (out.loss.mean() / SIGMA).backward()  # d/dx of the mean = g / n
    da, db = kl_gradient()
    assert gen.denoiser.a.grad.item() == pytest.approx(da, abs=4e-3)
    assert gen.denoiser.b.grad.item() == pytest.approx(db, abs=4e-3)


def test_vsd_bad_weighting_names_its_key(tmp_path):
    with pytest.raises(ValueError, match="objective.weighting"):
        build_experiment(compose_train(["objective=vsd", *TINY, f"run_dir={tmp_path}", "objective.weighting=sds"]))


# ------------------------------------------------------------------------------------------ Diff-Instruct


def test_diff_instruct_gradient_is_d_fake_minus_d_real_per_sample():
    """d loss_i / d x_i = D_fake - D_real exactly (no normaliser, docs/invariants.md §5)."""
    teacher, gen, fake = gaussian_roles(3)
    obj = DiffInstruct(teacher, gen, fake)
    x = torch.randn(5, 3, requires_grad=True)
    sigma = torch.full((5,), 0.9)
    x_t = x.detach() + 0.9 * torch.randn(5, 3)
    real, fk = teacher(x_t, sigma), fake(x_t, sigma)
    g = obj.dm_gradient(x.detach(), x_t, sigma, Conditioning(), real, fk)
    obj.inject(x, g).sum().backward()
    assert torch.equal(x.grad, fk - real)


def test_diff_instruct_unnormalised_gradient_equals_the_closed_form_kl_gradient():
    """E[(D_fake - D_real) dx/dtheta] / sigma^2 = grad KL(q_sigma || p_sigma) on the Gaussian toy (closed form
    -0.2332 / -0.4425 at a = 0.5, b = -0.2, s = 0.8, mu = 0.3, sigma = 0.7)."""
    n = 400_000
    torch.manual_seed(0)
    teacher, gen, fake = gaussian_roles(1)
    obj = DiffInstruct(teacher, gen, fake)
    obj.dm_sigmas = lambda k, device: torch.full((k,), SIGMA, device=device)
    out = obj.generator_loss(Batch(torch.zeros(n, 1), Conditioning()), 0)
    (out.loss.mean() / SIGMA**2).backward()
    da, db = kl_gradient()
    assert gen.denoiser.a.grad.item() == pytest.approx(da, abs=4e-3)
    assert gen.denoiser.b.grad.item() == pytest.approx(db, abs=4e-3)


def test_diff_instruct_draws_lognormal_sigmas_for_both_losses():
    """ln sigma ~ N(-1.2 + ln(sigma_data / 0.5), 1.2^2): the official law carried to the teacher's sigma_data (the
    paper's own with ``match_sigma_data=false``)."""
    teacher, gen, fake = gaussian_roles(2)
    shift = math.log(teacher.sigma_data / 0.5)
    assert abs(shift) > 0.3  # this Gaussian's sigma_data is not 0.5
    for obj, mean in (
        (DiffInstruct(teacher, gen, fake), -1.2 + shift),
        (DiffInstruct(teacher, gen, fake, match_sigma_data=False), -1.2),
    ):
        torch.manual_seed(0)
        for draw in (obj.dm_sigmas, obj.fake_sigmas):
            log_sigma = draw(200_000, "cpu").log()
            assert log_sigma.mean().item() == pytest.approx(mean, abs=0.01)
            assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)


def test_diff_instruct_with_the_exact_fake_converges_to_the_data():
    """SGD on the sigma^2-weighted KL gradient (lognormal sigma) with the exact fake denoiser: (a, b) -> (0.8, 0.3)."""
    torch.manual_seed(0)
    dim = 16
    teacher, gen, _ = gaussian_roles(dim)
    opt = torch.optim.SGD(gen.parameters(), lr=0.05)
    for _ in range(600):
        den = gen.denoiser
        fake = FakeScore(GaussianDenoiser(den.b.detach().clone(), den.a.detach().abs().clone()))
        out = DiffInstruct(teacher, gen, fake).generator_loss(Batch(torch.zeros(512, dim), Conditioning()), 0)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    assert gen.denoiser.a.abs().mean().item() == pytest.approx(0.8, abs=0.02)
    assert gen.denoiser.b.mean().item() == pytest.approx(0.3, abs=0.02)
    assert not math.isnan(gen.denoiser.a.sum().item())


def test_diff_instruct_warns_about_an_edm_sigma_init():
    import warnings

    teacher, _, fake = gaussian_roles(2)
    want = round(teacher.sigma_data / 0.5, 3)  # the paper's 1 at sigma_data 0.5, carried to this teacher's data
    with pytest.warns(UserWarning, match=f"set student.sigma_init={want}") as record:
        DiffInstruct(teacher, Generator(AffineDenoiser(2), sigma_init=80.0), fake)
    assert sum("sigma_init" in str(w.message) for w in record) == 1
    with pytest.warns(UserWarning, match="set student.sigma_init=1.0 "):
        DiffInstruct(teacher, Generator(AffineDenoiser(2), sigma_init=80.0), fake, match_sigma_data=False)
    with warnings.catch_warnings(record=True) as quiet:  # the paper's sigma_init 1.0: no warning
        warnings.simplefilter("always")
        DiffInstruct(teacher, Generator(AffineDenoiser(2), sigma_init=1.0), fake)
    assert not [w for w in quiet if "sigma_init" in str(w.message)]
