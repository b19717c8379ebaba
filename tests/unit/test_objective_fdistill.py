"""f-distill (arXiv:2502.15681): h(r) = f''(r) r^2, ratio estimation from the logits, equality with DMD2 at h = 1,
and the f-divergence gradient on the Gaussian toy (docs/invariants.md §5)."""

import math

import pytest
import torch

from diffdistill.models import Conditioning, FakeScore, GaussianDenoiser, Generator, Teacher
from diffdistill.models.analytic import AffineDenoiser
from diffdistill.models.conditioning import Batch
from diffdistill.models.discriminator import Discriminator
from diffdistill.objectives.common import gradient_injection_loss
from diffdistill.objectives.dmd2 import DMD2
from diffdistill.objectives.fdistill import WEIGHTS, FDistill, density_ratio, f_weight
from diffdistill.training.builders import build_experiment
from tests.helpers import TINY, compose_train

MU, S, D = 0.3, 0.8, 16
HEADS = {"network": "none", "taps": ["input"], "head": "mlp", "hidden": 8}

# the f of each divergence, written out independently of the module (D_f(p||q) = E_q f(p/q))
F = {
    "reverse_kl": lambda r: -math.log(r),
    "forward_kl": lambda r: r * math.log(r),
    "js": lambda r: r * math.log(r) - (1 + r) * math.log((1 + r) / 2),
    "squared_hellinger": lambda r: (math.sqrt(r) - 1) ** 2,
    "jeffreys": lambda r: (r - 1) * math.log(r),
    "neyman": lambda r: (1 - r) ** 2 / r,
}


def roles(a=0.5, b=-0.2, seed=0):
    torch.manual_seed(seed)
    teacher = Teacher(GaussianDenoiser(torch.full((D,), MU), torch.full((D,), S)))
    gen = Generator(AffineDenoiser(D, a, b), sigma_init=80.0)
    fake = FakeScore(GaussianDenoiser(torch.full((D,), b), torch.full((D,), abs(a)), trainable=True))
    disc = Discriminator.for_network(None, ["input"], "mlp", 8, (D,), 0.5)
    return teacher, gen, fake, disc


def real_batch(n):
    return Batch(MU + S * torch.randn(n, D), Conditioning())


def generator_step(cls, disc_logit=None, **kw):
    """The generator loss and the generator's gradient of one update of ``cls`` on fixed inputs and seeds."""
    teacher, gen, fake, disc = roles()
    if disc_logit is not None:  # a discriminator whose logit is the constant ``disc_logit``
        last = [m for m in disc.modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.constant_(last.bias, disc_logit)
    obj = cls(teacher, gen, fake, disc, discriminator_heads=HEADS, **kw)
    torch.manual_seed(1)
    batch = real_batch(64)
    out = obj.generator_loss(batch, 0)
    out.loss.mean().backward()
    return out.loss.detach(), [p.grad.clone() for p in gen.parameters()]


@pytest.mark.parametrize("divergence", sorted(WEIGHTS))
def test_h_is_f_second_derivative_times_r_squared(divergence):
    """h(r) / h(1) = f''(r) r^2 / f''(1), f'' by central differences of the divergence's f."""
    f, eps = F[divergence], 1e-4

    def f2(r):
        return (f(r + eps) - 2 * f(r) + f(r - eps)) / eps**2

    rs = torch.tensor([0.3, 1.0, 2.5, 7.0], dtype=torch.float64)
    h = f_weight(rs, divergence)
    expected = torch.tensor([f2(float(r)) * float(r) ** 2 for r in rs], dtype=torch.float64)
    assert torch.allclose(h / h[1], expected / expected[1], rtol=1e-4)


def test_reverse_kl_is_dmd2_exactly():
    """h = 1 (reverse KL): the same loss and the same generator gradient as DMD2, bit for bit."""
    loss_f, grad_f = generator_step(FDistill, divergence="reverse_kl")
    loss_d, grad_d = generator_step(DMD2)
    assert torch.equal(loss_f, loss_d) and all(torch.equal(a, b) for a, b in zip(grad_f, grad_d))


def test_reverse_kl_is_dmd2_exactly_with_the_regression_option_too():
    """DMD v1's regression, passed through to DMD2: still the same loss and gradient as DMD2 with it, and a typo
    in its keys is an error naming the key."""
    reg = dict(regression_weight=0.25, regression_pairs=32, regression_steps=4, regression_distance="l2")
    loss_f, grad_f = generator_step(FDistill, divergence="reverse_kl", **reg)
    loss_d, grad_d = generator_step(DMD2, **reg)
    loss_0, _ = generator_step(DMD2)
    assert torch.equal(loss_f, loss_d) and all(torch.equal(a, b) for a, b in zip(grad_f, grad_d))
    assert not torch.equal(loss_d, loss_0)
    with pytest.raises(TypeError, match="regresion_weight"):
        generator_step(FDistill, regresion_weight=0.25)


@pytest.mark.parametrize("divergence", ["forward_kl", "js", "jeffreys", "neyman"])
def test_a_constant_ratio_gives_dmd2_for_every_divergence(divergence):
    """Through the discriminator pass: equal logits everywhere make h constant, hence 1 after normalisation."""
    loss_f, grad_f = generator_step(FDistill, disc_logit=0.7, divergence=divergence)
    loss_d, grad_d = generator_step(DMD2, disc_logit=0.7)  # the same GAN term
    assert torch.allclose(loss_f, loss_d, rtol=1e-6, atol=0)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-12) for a, b in zip(grad_f, grad_d))


def test_a_varying_ratio_changes_the_update():
    loss_f, _ = generator_step(FDistill, divergence="forward_kl")  # the heads' random init: logits vary
    loss_d, _ = generator_step(DMD2)
    assert not torch.allclose(loss_f, loss_d)


def test_forward_kl_weight_with_the_exact_ratio_gives_the_forward_kl_gradient():
    """E_q[h(r) (s_q - s_p) dx/dtheta] with r = p_sigma / q_sigma exact and h = r equals grad KL(p_sigma || q_sigma)
    (docs/invariants.md §5: closed form -0.5844 / -0.6757 at a = 0.5, b = -0.2, s = 0.8, mu = 0.3, sigma = 0.7)."""
    a, b, sigma, n = 0.5, -0.2, 0.7, 4_000_000
    torch.manual_seed(0)
    gen = Generator(AffineDenoiser(1, a, b), 80.0)
    x = gen(torch.randn(n, 1))
    sig = torch.full((n,), sigma)
    x_t = x.detach() + sigma * torch.randn_like(x)
    R, A = S**2 + sigma**2, a**2 + sigma**2
    log_p = -0.5 * (x_t - MU) ** 2 / R - 0.5 * math.log(R)
    log_q = -0.5 * (x_t - b) ** 2 / A - 0.5 * math.log(A)
    r = density_ratio((log_p - log_q)[:, 0], logit_clamp=None, ratio_range=(None, None))
    h = f_weight(r, "forward_kl")[:, None]
    real = GaussianDenoiser(torch.tensor([MU]), torch.tensor([S]))(x_t, sig)
    fake = GaussianDenoiser(torch.tensor([b]), torch.tensor([a]))(x_t, sig)
    g = h * (fake - real) / sigma**2  # = h (s_q - s_p)
    gradient_injection_loss(x, g).mean().backward()  # d/dx = g / n: a Monte-Carlo mean
    # r's tail makes the estimate noisy: standard errors ~2.4e-3 (a) and 1.1e-3 (b) at this n
    assert gen.denoiser.a.grad.item() == pytest.approx(a * (1 / A - R / A**2 - (b - MU) ** 2 / A**2), abs=1e-2)
    assert gen.denoiser.b.grad.item() == pytest.approx((b - MU) / A, abs=5e-3)


def test_logits_are_clamped_and_ratios_clipped_and_normalised_to_batch_mean_one():
    teacher, gen, fake, disc = roles()
    obj = FDistill(teacher, gen, fake, disc, discriminator_heads=HEADS, divergence="forward_kl")
    assert torch.allclose(density_ratio(torch.tensor([-50.0, 0.0, 50.0])), torch.tensor([0.1, 1.0, 20.0]))
    assert density_ratio(torch.tensor([50.0]), 1.0, (None, None)).item() == pytest.approx(math.e)
    h = obj.f_weights(torch.tensor([-50.0, 0.0, math.log(2.0), 50.0]), torch.ones(4))
    r = torch.tensor([0.1, 1.0, 2.0, 20.0])
    assert torch.allclose(h, r / r.mean()) and h.mean().item() == pytest.approx(1.0)
    js = FDistill(teacher, gen, fake, disc, discriminator_heads=HEADS).f_weights(torch.zeros(3), torch.ones(3))
    assert torch.allclose(js, torch.ones(3))


def test_running_mean_per_bin_divides_the_ratio_and_is_checkpointed():
    teacher, gen, fake, disc = roles()
    obj = FDistill(
        teacher, gen, fake, disc, discriminator_heads=HEADS, divergence="forward_kl", ratio_normalization=True
    )
    lo, hi = obj.sigmas[5], obj.sigmas[995]  # the first and the last of 10 bins
    sigma = torch.stack([lo, lo, hi, hi])
    logits = torch.log(torch.tensor([1.0, 3.0, 4.0, 8.0]))
    obj.f_weights(logits, sigma)  # running means still 1: nothing divided yet
    obj.on_step_end(0)
    assert obj.ratio_mean[0].item() == pytest.approx(2.0) and obj.ratio_mean[9].item() == pytest.approx(6.0)
    assert torch.all(obj.ratio_mean[1:9] == 1.0)
    h = obj.f_weights(logits, sigma)  # r / mean_bin: [0.5, 1.5, 2/3, 4/3], then batch mean 1
    expected = torch.tensor([0.5, 1.5, 4 / 6, 8 / 6])
    assert torch.allclose(h, expected / expected.mean())
    obj.on_step_end(1)  # EMA: 0.99 * 2 + 0.01 * 2 = 2 (the same batch)
    assert obj.ratio_mean[0].item() == pytest.approx(2.0) and obj.ratio_seen[0].item() == 4
    state = obj.state_dict()
    fresh = FDistill(
        teacher, gen, fake, disc, discriminator_heads=HEADS, divergence="forward_kl", ratio_normalization=True
    )
    fresh.load_state_dict(state)
    assert torch.equal(fresh.ratio_mean, obj.ratio_mean)
    with pytest.raises(ValueError, match="ratio_bins"):
        FDistill(teacher, gen, fake, disc, discriminator_heads=HEADS, ratio_bins=4).load_state_dict(state)


def test_bad_settings_name_their_key(tmp_path):
    base = ["objective=fdistill", *TINY, f"run_dir={tmp_path}"]
    with pytest.raises(ValueError, match="objective.divergence"):
        build_experiment(compose_train([*base, "objective.divergence=tv"]))
    with pytest.raises(ValueError, match="gan_generator_weight"):
        build_experiment(compose_train([*base, "objective.gan_generator_weight=0.0"]))
    with pytest.raises(ValueError, match="ratio_min"):
        build_experiment(compose_train([*base, "objective.ratio_min=30.0"]))


def test_pass_count_adds_the_logit_pass_except_at_h_one(tmp_path):
    base = ["objective=fdistill", *TINY, f"run_dir={tmp_path}"]
    js = build_experiment(compose_train(base)).objective
    rkl = build_experiment(compose_train([*base, "objective.divergence=reverse_kl"])).objective
    extra = js.pass_count().forward - rkl.pass_count().forward
    f = [m.feature_pass_cost for m in js.fake_score.modules() if hasattr(m, "feature_pass_cost")]
    assert extra == pytest.approx((f[0] if f else 1.0) / 5)
    assert rkl.pass_count() == DMD2.pass_count(rkl)


def test_running_means_update_through_a_generator_step():
    """The whole path (discriminator logits [B, heads] -> r -> bins) inside generator_loss and on_step_end."""
    teacher, gen, fake, disc = roles()
    obj = FDistill(
        teacher, gen, fake, disc, discriminator_heads=HEADS, divergence="forward_kl", ratio_normalization=True
    )
    out = obj.generator_loss(real_batch(64), 0)
    assert out.loss.shape == (64,) and obj.last_weights.shape == (64,) and out.logs["f_weight_max"] > 1
    obj.on_step_end(0)
    assert obj.ratio_seen.sum().item() == 64 and torch.any(obj.ratio_mean != 1.0)
