"""SIM invariants on the Gaussian toy (docs/invariants.md, Gaussian toolkit): zero gradient at p = q, the
closed-form teacher VJP, the sign change of the expected gradient at the optimum, and the paper-open choices of
``diffdistill.objectives.sim.SIM`` (detached y, data-unit pseudo-Huber with c = 0.00054 sqrt(D), w = sigma^2)."""

import math

import pytest
import torch

from diffdistill.data import Batch
from diffdistill.models import Conditioning, FakeScore, GaussianDenoiser, Generator, Teacher
from diffdistill.models.analytic import AffineDenoiser
from diffdistill.objectives import SIM
from diffdistill.objectives import sim as sim_module
from diffdistill.objectives.sim import pseudo_huber_grad

MU, S, D = 0.3, 0.8, 16


def setup(a=0.5, b=-0.2, fake_mean=None, fake_std=None, **kw):
    teacher = Teacher(GaussianDenoiser(torch.full((D,), MU), torch.full((D,), S)))
    gen = Generator(AffineDenoiser(D, a, b), sigma_init=2.5)
    fm = b if fake_mean is None else fake_mean
    fs = abs(a) if fake_std is None else fake_std
    fake = FakeScore(GaussianDenoiser(torch.full((D,), fm), torch.full((D,), fs), trainable=True))
    return teacher, gen, fake, SIM(teacher, gen, fake, **kw)


def batch(n):
    return Batch(torch.zeros(n, D), Conditioning())


def fixed_sigma(obj, sigma):
    obj.sample_sigmas = lambda n, device: torch.full((n,), float(sigma), device=device)


def loss_and_samples(obj, n):
    """The generator loss with ``x_g`` kept (its gradient retained)."""
    captured = {}
    orig = sim_module.generate

    def generate(*args, **kw):
        x, j = orig(*args, **kw)
        x.retain_grad()
        captured["x"] = x
        return x, j

    sim_module.generate = generate
    try:
        out = obj.generator_loss(batch(n), 1)
    finally:
        sim_module.generate = orig
    return out, captured["x"]


def test_p_equals_q_gives_zero_loss_and_gradient():
    teacher, gen, _, _ = setup()
    obj = SIM(teacher, gen, FakeScore.from_teacher(teacher))
    out = obj.generator_loss(batch(64), 1)
    assert torch.count_nonzero(out.loss) == 0
    out.loss.mean().backward()
    assert gen.denoiser.a.grad.abs().max() == 0 and gen.denoiser.b.grad.abs().max() == 0


@pytest.mark.parametrize("sigma", [0.05, 0.7, 5.0])
def test_gradient_is_the_closed_form_teacher_vjp(sigma):
    """grad_{x_g} L = (J_teacher - I)^T d'(f_phi - f_psi) = -sigma^2 / (s^2 + sigma^2) d' for the Gaussian teacher,
    whatever the fake score's Jacobian (y is detached: no backprop through the fake score)."""
    torch.manual_seed(0)
    teacher, gen, fake, obj = setup(a=0.5, b=-0.2, fake_mean=0.1, fake_std=0.3)
    fixed_sigma(obj, sigma)
    torch.manual_seed(1)
    out, x_g = loss_and_samples(obj, 32)
    out.loss.sum().backward()
    torch.manual_seed(1)
    x = gen(torch.randn(32, D)).detach()
    sig = torch.full((32,), sigma)
    x_t = x + sigma * torch.randn_like(x)
    y = teacher(x_t, sig) - fake(x_t, sig)
    c = 0.00054 * math.sqrt(D) * float(teacher.sigma_data) / 0.5  # the default, at the teacher's sigma_data
    d_prime = y / (y.pow(2).sum(1, keepdim=True) + c * c).sqrt()
    want = -(sigma**2) / (S**2 + sigma**2) * d_prime
    torch.testing.assert_close(x_g.grad, want, rtol=1e-4, atol=1e-7)
    assert fake.denoiser.mean.grad is None and fake.denoiser.log_std.grad is None


@pytest.mark.parametrize("param,below,above,a,b", [("a", 0.79, 0.81, None, 0.3), ("b", 0.25, 0.35, 0.8, None)])
def test_expected_gradient_changes_sign_at_the_optimum(param, below, above, a, b):
    """Exact fake score: d/da < 0 just below |a| = s and > 0 just above; the same for b around mu."""
    signs = []
    for value in (below, above):
        aa, bb = (value, b) if param == "a" else (a, value)
        torch.manual_seed(0)
        _, gen, _, obj = setup(aa, bb)
        obj.generator_loss(batch(4096), 1).loss.mean().backward()
        signs.append(getattr(gen.denoiser, param).grad.mean().item())
    assert signs[0] < 0 < signs[1]


def test_pseudo_huber_derivative():
    """d'(y) = y / sqrt(||y||^2 + c^2) on the flattened sample: norm < 1, ~ y / c near 0, 0 at y = 0 (even c = 0)."""
    y = torch.randn(5, 3, 4)
    c = 0.3
    d = pseudo_huber_grad(y, c)
    n2 = y.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(d, y / (n2 + c * c).sqrt()[:, None, None])
    assert (d.flatten(1).norm(dim=1) < 1).all()
    # the derivative of the pseudo-Huber value sqrt(||y||^2 + c^2) - c
    yg = y.clone().requires_grad_(True)
    ((yg.flatten(1).pow(2).sum(1) + c * c).sqrt() - c).sum().backward()
    torch.testing.assert_close(yg.grad, d)
    assert torch.count_nonzero(pseudo_huber_grad(torch.zeros(2, 3), 0.0)) == 0


def test_default_c_is_icts_data_unit_constant():
    """iCT's c = 0.00054 sqrt(D) at sigma_data = 0.5, carried to the teacher's sigma_data like the noise levels."""
    teacher, _, _, obj = setup()
    assert float(teacher.sigma_data) != 0.5
    assert obj.c == pytest.approx(0.00054 * math.sqrt(D) * float(teacher.sigma_data) / 0.5)
    assert setup(match_sigma_data=False)[3].c == pytest.approx(0.00054 * math.sqrt(D))
    assert setup(c=0.0)[3].c == 0.0
    with pytest.raises(ValueError, match="c must be"):
        setup(c=-1.0)


def test_sim_with_exact_fake_converges_to_data():
    """The detached-y surrogate descends to the data distribution: (a, b) -> (0.8, 0.3)."""
    torch.manual_seed(0)
    teacher, gen, _, _ = setup()
    opt = torch.optim.Adam(gen.parameters(), lr=0.01, betas=(0.0, 0.999))
    for _ in range(300):
        den = gen.denoiser
        fake = FakeScore(GaussianDenoiser(den.b.detach().clone(), den.a.detach().abs().clone()))
        out = SIM(teacher, gen, fake).generator_loss(batch(256), 1)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    assert gen.denoiser.a.abs().mean().item() == pytest.approx(0.8, abs=0.03)
    assert gen.denoiser.b.mean().item() == pytest.approx(0.3, abs=0.03)


def test_fake_score_is_trained_as_in_sid_and_pass_count():
    torch.manual_seed(0)
    _, gen, fake, obj = setup()
    out = obj.critic_loss(batch(32), 0)
    assert out.loss.shape == (32,) and torch.isfinite(out.loss).all()
    out.loss.mean().backward()
    assert fake.denoiser.mean.grad is not None and gen.denoiser.a.grad is None
    # G fwd+bwd, teacher fwd+bwd to the input, fake fwd without graph; fake update: G fwd, fake fwd+bwd
    assert obj.pass_count().cost() == pytest.approx(11.0)


def test_toy_run_reaches_the_true_distribution(tmp_path):
    """experiment=toy/sim through the trainer (trained exact-family fake score, 1:1, Adam betas (0, 0.999))."""
    from diffdistill.training.builders import build_trainer
    from tests.helpers import compose_train

    cfg = ["experiment=toy/sim", "trainer.device=cpu", f"run_dir={tmp_path}", "logger=none"]
    cfg.append("trainer.checkpoint_every=0")
    trainer = build_trainer(compose_train(cfg))
    trainer.fit()
    ema = trainer.emas[0.9].module.denoiser
    assert ema.a.abs().mean().item() == pytest.approx(S, abs=0.02)
    assert ema.b.mean().item() == pytest.approx(MU, abs=0.025)
