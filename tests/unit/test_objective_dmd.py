"""DMD invariants on the Gaussian toy (docs/invariants.md §5, toy in §1)."""

import math

import pytest
import torch

from diffdistill.data import Batch, GaussianToy
from diffdistill.models import Conditioning, FakeScore, GaussianDenoiser, Generator, Teacher
from diffdistill.models.analytic import AffineDenoiser
from diffdistill.objectives import DMD, UpdateSchedule
from diffdistill.objectives.common import gradient_injection_loss
from diffdistill.objectives.dmd import dmd_gradient

MU, S, D = 0.3, 0.8, 16


def setup(a=0.5, b=-0.2, guidance=1.0):
    teacher = Teacher(GaussianDenoiser(torch.full((D,), MU), torch.full((D,), S)), guidance)
    gen = Generator(AffineDenoiser(D, a, b), sigma_init=80.0)
    fake = FakeScore(GaussianDenoiser(torch.full((D,), b), torch.full((D,), abs(a)), trainable=True))
    return teacher, gen, fake


def batch(n):
    return Batch(torch.zeros(n, D), Conditioning())


def test_fake_equals_real_gives_zero_gradient_and_loss():
    teacher, gen, _ = setup()
    fake = FakeScore.from_teacher(teacher)  # identical to the teacher
    obj = DMD(teacher, gen, fake)
    out = obj.generator_loss(batch(64), 0)
    assert torch.count_nonzero(out.loss) == 0
    out.loss.mean().backward()
    assert torch.count_nonzero(gen.denoiser.a.grad) == 0 and torch.count_nonzero(gen.denoiser.b.grad) == 0


def test_surrogate_gradient_is_g_over_numel():
    x = torch.randn(4, 3, 5, requires_grad=True)
    g = torch.randn(4, 3, 5)
    loss = gradient_injection_loss(x, g)
    assert loss.shape == (4,)
    loss.mean().backward()
    assert torch.allclose(x.grad, g / x.numel(), atol=1e-7)


def test_unnormalised_gradient_equals_kl_gradient():
    """E[(x0_fake - x0_real)/sigma^2 * dx/dtheta] = grad KL(q_sigma || p_sigma) (docs/invariants.md §5)."""
    a, b, sigma = 0.5, -0.2, 0.7
    teacher, gen, fake = setup(a, b)
    n = 400_000
    torch.manual_seed(0)
    z = torch.randn(n, 1).expand(n, 1)
    gen1 = Generator(AffineDenoiser(1, a, b), 80.0)
    x = gen1(z[:, :1])
    sig = torch.full((n,), sigma)
    x_t = x.detach() + sigma * torch.randn_like(x)
    real = GaussianDenoiser(torch.tensor([MU]), torch.tensor([S]))(x_t, sig)
    fake1 = GaussianDenoiser(torch.tensor([b]), torch.tensor([a]))(x_t, sig)
    g = dmd_gradient(x.detach(), real, fake1, normalize=False) / sigma**2
    (gradient_injection_loss(x, g).mean() * x.shape[1]).backward()  # d/dx = g / n: a Monte-Carlo mean
    R, A = S**2 + sigma**2, a**2 + sigma**2
    assert gen1.denoiser.a.grad.item() == pytest.approx(a * (1 / R - 1 / A), abs=4e-3)  # -0.2332
    assert gen1.denoiser.b.grad.item() == pytest.approx((b - MU) / R, abs=4e-3)  # -0.4425


def test_descent_moves_towards_the_real_prediction():
    teacher, gen, fake = setup()
    x = gen(torch.randn(256, D)).detach()
    x_t = x + 2.0 * torch.randn_like(x)
    sig = torch.full((256,), 2.0)
    real, fk = teacher(x_t, sig), fake(x_t, sig)
    g = dmd_gradient(x, real, fk)
    assert ((-g) * (real - fk)).flatten(1).sum(1).gt(0).all()


def test_normalised_dmd_with_exact_fake_converges_to_data():
    """With the DMD2 normaliser and the exact fake denoiser, SGD drives (a, b) -> (0.8, 0.3)."""
    torch.manual_seed(0)
    teacher, gen, _ = setup()
    opt = torch.optim.SGD(gen.parameters(), lr=0.05)
    for _ in range(400):
        den = gen.denoiser
        fake = FakeScore(GaussianDenoiser(den.b.detach().clone(), den.a.detach().abs().clone()))
        obj = DMD(teacher, gen, fake)
        out = obj.generator_loss(batch(512), 0)
        opt.zero_grad()
        (out.loss.mean() * D).backward()  # per-sample gradient g / B
        opt.step()
    assert gen.denoiser.a.abs().mean().item() == pytest.approx(0.8, abs=0.02)
    assert gen.denoiser.b.mean().item() == pytest.approx(0.3, abs=0.02)


def test_dm_timesteps_and_fake_loss_range():
    teacher, gen, fake = setup()
    obj = DMD(teacher, gen, fake)
    assert (obj.k_min, obj.k_max) == (20, 980)
    assert obj.sigmas[obj.k_min].item() == pytest.approx(0.0032, abs=1e-4)
    assert obj.sigmas[obj.k_max].item() == pytest.approx(72.05, abs=0.05)
    out = obj.critic_loss(batch(32), 0)
    assert out.loss.shape == (32,) and torch.isfinite(out.loss).all()
    out.loss.mean().backward()
    assert fake.denoiser.mean.grad is not None


def test_update_schedule_counts():
    sch = UpdateSchedule(critic_steps_per_generator_step=5)
    n = 23
    assert sum(sch.is_generator_step(s) for s in range(n)) == math.ceil(n / 5)
    warm = UpdateSchedule(2, generator_warmup_steps=3)
    assert [warm.is_generator_step(s) for s in range(7)] == [False, False, False, True, False, True, False]


def test_pass_count_and_registry():
    from diffdistill.objectives import OBJECTIVES

    assert OBJECTIVES["dmd"] is DMD
    teacher, gen, fake = setup()
    pc = DMD(teacher, gen, fake).pass_count()
    assert (pc.forward, pc.forward_grad, pc.backward) == (2.0, 2.0, 2.0)
    pc5 = DMD(teacher, gen, fake, critic_steps_per_generator_step=5).pass_count()
    assert pc5.cost() < pc.cost()
    with pytest.raises(ValueError):
        DMD(teacher, gen, fake, min_step_percent=0.9, max_step_percent=0.1)


def test_toy_data_teacher_matches_dataset():
    data = GaussianToy(dim=4, mean=0.3, std=0.8)
    x = data.get(torch.arange(50_000)).x0
    assert x.mean().item() == pytest.approx(0.3, abs=0.01) and x.std().item() == pytest.approx(0.8, abs=0.01)
    assert torch.allclose(data.teacher().mean, torch.full((4,), 0.3))


def test_dm_gradient_is_blind_to_mode_weights_below_the_mode_separation():
    """Why DM objectives leave mode weights wrong (docs/invariants.md §5b). Fake and real mixtures with the same
    modes (+-2, std 0.1) and weights 0.8 / 0.2 against 0.5 / 0.5: at sigma <= 0.3 both denoisers assign every noisy
    sample to its own mode, so ``x0_fake - x0_real`` is exactly 0 and the gradient carries no weight information;
    only at sigma comparable to the separation does it appear, and there it pushes the samples of *both* modes the
    same way (a drift toward the under-weighted mode, not a transfer of mass between them)."""
    from diffdistill.models.analytic import GaussianMixtureDenoiser

    means = [[-2.0], [2.0]]
    real = GaussianMixtureDenoiser(means, 0.1, [0.5, 0.5], conditional=False)
    fake = GaussianMixtureDenoiser(means, 0.1, [0.8, 0.2], conditional=False)
    g = torch.Generator().manual_seed(0)
    x, labels = fake.sample(20000, generator=g)
    eps = torch.randn(x.shape, generator=g)

    def dm(sigma: float) -> torch.Tensor:
        s = torch.full((len(x),), sigma)
        x_t = x + sigma * eps
        return dmd_gradient(x, real.denoise(x_t, s, Conditioning()), fake.denoise(x_t, s, Conditioning()), False)

    for sigma in (0.02, 0.1, 0.3):
        assert float(dm(sigma).abs().max()) < 1e-6
    big = dm(2.0)
    per_mode = [float(big[labels == k].mean()) for k in (0, 1)]
    assert per_mode[0] < -0.1 and per_mode[1] < -0.1  # descent (-g) moves both modes toward the light one (+2)
