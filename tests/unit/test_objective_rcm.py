"""rCM (docs/invariants.md §4): critic loss identity, alternating schedule, backward simulation, Gaussian toy."""

import pytest
import torch

from diffdistill.conventions import append_dims, edm_to_trig
from diffdistill.data import GaussianToy
from diffdistill.data.images import Batch
from diffdistill.models import Conditioning, FakeScore, Generator, Teacher
from diffdistill.models.builders import edm_mlp
from diffdistill.models.consistency import AffineConsistencyDenoiser, trigflow_F
from diffdistill.objectives.rcm import RCM, RCMSchedule, rcm_critic_loss

torch.set_num_threads(1)
MU, S, DIM = 0.3, 0.8, 16


@pytest.fixture
def toy():
    return GaussianToy(dim=DIM, mean=MU, std=S)


def _rcm(toy, **kw):
    teacher = Teacher(toy.teacher())
    gen = Generator(AffineConsistencyDenoiser(DIM, a_init=0.5, b_init=0.0, boundary_sigma=0.0), sigma_init=80.0)
    fake = FakeScore.from_teacher(teacher)
    kw = {"jvp_backend": "finite_difference", "tangent_warmup_steps": 10, **kw}
    return RCM(teacher=teacher, generator=gen, fake_score=fake, **kw), gen, fake


@pytest.mark.parametrize("sigma", [0.05, 0.7, 3.0, 40.0])
def test_critic_loss_is_the_flow_space_mse(sigma):
    """docs/invariants.md §4 (sigma_d = 1): ||x0 - x0_fake||^2 / sin^2 t = ||F_fake - (cos t x_t - x0) / sin t||^2."""
    torch.manual_seed(0)
    fake = edm_mlp(dim=DIM, hidden=32, depth=2, sigma_data=1.0)
    x0, eps = torch.randn(8, DIM), torch.randn(8, DIM)
    s = torch.full((8,), sigma)
    with torch.no_grad():
        ours = rcm_critic_loss(fake, x0, s, None, 1.0, noise=eps)
        x_trig, t = edm_to_trig(x0 + sigma * eps, s, 1.0)
        F = trigflow_F(fake, x_trig, t, None, 1.0)
        c, sn = append_dims(torch.cos(t), 2), append_dims(torch.sin(t), 2)
        flow = (F - (c * x_trig - x0) / sn).pow(2).sum(1)
    assert torch.allclose(ours, flow, rtol=1e-4, atol=1e-5)
    assert float(ours.min()) > 0


def test_schedule_alternates_after_the_warmup(toy):
    sched = RCMSchedule(critic_steps_per_generator_step=5, tangent_warmup_steps=10)
    gen_steps = [s for s in range(30) if sched.is_generator_step(s)]
    assert gen_steps == list(range(10)) + [10, 15, 20, 25]  # student-only warm-up, then 4 critic : 1 student
    obj, _, _ = _rcm(toy)
    batch = Batch(toy.get(torch.arange(16)).x0, Conditioning())
    assert obj.critic_loss(batch, 3) is None and obj.critic_loss(batch, 15) is None
    out = obj.critic_loss(batch, 11)
    assert out is not None and out.loss.shape == (16,) and torch.isfinite(out.loss).all()
    warm = obj.generator_loss(batch, 3)
    assert "dmd_loss" not in warm.logs and "dmd_loss" in obj.generator_loss(batch, 10).logs


@pytest.mark.parametrize("n", [1, 2, 4])
def test_backward_simulation_grad_only_through_the_last_call(toy, n):
    obj, gen, _ = _rcm(toy)
    calls = []
    inner = gen.denoise

    def spy(x, sigma, cond=None):
        calls.append((torch.is_grad_enabled(), sigma.clone()))
        return inner(x, sigma, cond)

    gen.denoise = spy
    x0, _ = obj.backward_simulation(Batch(toy.get(torch.arange(32)).x0, Conditioning()), n, grad=True)
    assert [g for g, _ in calls] == [False] * (n - 1) + [True]
    sig = torch.stack([s for _, s in calls])
    assert torch.equal(sig[0], torch.full((32,), 80.0)) and (sig[1:] <= sig[:-1]).all()  # monotone
    assert x0.requires_grad


def test_pass_count_and_registry(toy):
    obj, _, _ = _rcm(toy)
    pc = obj.pass_count()
    assert pc.jvp == 0.0 and pc.forward > 0  # finite-difference JVP: forwards only
    obj_ad, _, _ = _rcm(toy, jvp_backend="autograd")
    assert obj_ad.pass_count().jvp == pytest.approx(1 / 5)
    assert RCM.paper is not None and RCM.roles == ("generator", "fake_score")


def test_toy_rcm_reaches_data(toy):
    """sCD warm-up, then sCD + score regulariser with a 4:1 critic: one-step samples reach N(0.3, 0.8^2)."""
    torch.manual_seed(0)
    obj, gen, fake = _rcm(toy, tangent_warmup_steps=200, P_mean=-1.0, P_std=1.4)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-2)
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-2)
    for step in range(700):
        batch = Batch(MU + S * torch.randn(256, DIM), Conditioning())
        if obj.update_schedule.is_generator_step(step):
            out = obj.generator_loss(batch, step)
            opt_g.zero_grad()
            out.loss.mean().backward()
            opt_g.step()
        crit = obj.critic_loss(batch, step)
        if crit is not None:
            opt_f.zero_grad()
            crit.loss.mean().backward()
            opt_f.step()
    with torch.no_grad():
        z = torch.randn(4096, DIM)
        one = gen(z)
        two = gen.sample(z, sigmas=[80.0, 0.8])
    for x in (one, two):
        assert abs(float(x.mean()) - MU) < 0.03 and abs(float(x.std()) - S) < 0.04
