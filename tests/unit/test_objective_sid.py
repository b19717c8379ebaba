"""SiD invariants on the Gaussian toy (docs/invariants.md, Gaussian toolkit): zero gradient at fake = teacher, the
alpha semantics against closed-form Fisher-divergence gradients, both gradient paths, frozen score parameters,
NaN dropping, LSG guidance, few-step students, activation checkpointing."""

import pytest
import torch

from diffdistill.data import Batch
from diffdistill.models import Conditioning, FakeScore, GaussianDenoiser, Generator, Teacher
from diffdistill.models.analytic import AffineDenoiser, GaussianMixtureDenoiser
from diffdistill.objectives import SiD
from diffdistill.objectives import sid as sid_module
from diffdistill.objectives.score_identity import guided_denoise, truncated_karras_sigmas

MU, S, D = 0.3, 0.8, 16


def setup(a=0.5, b=-0.2, dim=D, **kw):
    teacher = Teacher(GaussianDenoiser(torch.full((dim,), MU), torch.full((dim,), S)))
    gen = Generator(AffineDenoiser(dim, a, b), sigma_init=2.5)
    fake = FakeScore(GaussianDenoiser(torch.full((dim,), b), torch.full((dim,), abs(a)), trainable=True))
    return teacher, gen, fake, SiD(teacher, gen, fake, **kw)


def batch(n):
    return Batch(torch.zeros(n, D), Conditioning())


def fixed_sigma(obj, sigma):
    obj.sample_sigmas = lambda n, device: torch.full((n,), float(sigma), device=device)


def test_fake_equals_teacher_gives_zero_loss_and_gradient():
    teacher, gen, _, _ = setup()
    fake = FakeScore.from_teacher(teacher)  # identical to the teacher
    obj = SiD(teacher, gen, fake)
    out = obj.generator_loss(batch(64), 1)
    assert torch.count_nonzero(out.loss) == 0
    out.loss.mean().backward()
    assert gen.denoiser.a.grad.abs().max() == 0 and gen.denoiser.b.grad.abs().max() == 0


@pytest.mark.parametrize(
    "alpha,closed",
    [
        # full Fisher gradient: d_a = -2a (R^2 - A^2) / (R^2 A^2), d_b = 2 (b - mu) / R^2
        (0.5, "full"),
        # sampling distribution held fixed: d_a = -4a (R - A) / (A^2 R), d_b = 2 (b - mu) / (R A)
        (1.0, "fixed"),
    ],
)
def test_alpha_semantics_match_closed_form_fisher_gradients(alpha, closed):
    """Exact fake, fixed sigma, no normaliser: 2 E[grad L_alpha] / sigma^4 is the Fisher-divergence gradient."""
    a, b, sigma = 0.5, -0.2, 0.7
    torch.manual_seed(0)
    _, gen, _, obj = setup(a, b, dim=1, alpha=alpha, normalize=False, generator_loss_scale=1.0)
    fixed_sigma(obj, sigma)
    n = 400_000
    obj.generator_loss(Batch(torch.zeros(n, 1), Conditioning()), 1).loss.mean().backward()
    R, A = S**2 + sigma**2, a**2 + sigma**2
    if closed == "full":
        want_a, want_b = -2 * a * (R**2 - A**2) / (R**2 * A**2), 2 * (b - MU) / R**2  # -1.0430, -0.7831
    else:
        want_a, want_b = -4 * a * (R - A) / (A**2 * R), 2 * (b - MU) / (R * A)  # -1.2605, -1.1959
    got_a = 2 * gen.denoiser.a.grad.item() / sigma**4
    got_b = 2 * gen.denoiser.b.grad.item() / sigma**4
    assert got_a == pytest.approx(want_a, abs=0.02)
    assert got_b == pytest.approx(want_b, abs=0.02)


def test_the_two_alphas_give_different_gradients():
    """The closed forms above differ by ~0.2 and ~0.4: the test above could not pass with a wrong alpha."""
    grads = []
    for alpha in (0.5, 1.0):
        torch.manual_seed(0)
        _, gen, _, obj = setup(dim=1, alpha=alpha, normalize=False)
        fixed_sigma(obj, 0.7)
        obj.generator_loss(Batch(torch.zeros(100_000, 1), Conditioning()), 1).loss.mean().backward()
        grads.append(gen.denoiser.b.grad.item())
    assert abs(grads[0] - grads[1]) > 0.2 * abs(grads[0])


def capture_samples(monkeypatch) -> dict:
    """Make SiD keep its generator samples ``x_g`` (gradient retained) in the returned dict."""
    captured = {}
    orig = sid_module.generate

    def generate(*args, **kw):
        x, j = orig(*args, **kw)
        x.retain_grad()
        captured["x"] = x
        return x, j

    monkeypatch.setattr(sid_module, "generate", generate)
    return captured


def test_detaching_x_t_changes_the_gradient_and_leaves_the_direct_path(monkeypatch):
    """With x_t detached only d/dx_g of the (f_phi - x_g) term remains: -(f_phi - f_psi) / omega per element."""
    orig = sid_module.generate
    captured = capture_samples(monkeypatch)
    grads = {}
    for through in (True, False):
        torch.manual_seed(0)
        _, gen, _, obj = setup(score_gradients=through, generator_loss_scale=1.0)
        obj.generator_loss(batch(256), 1).loss.sum().backward()
        grads[through] = captured["x"].grad.clone()
    # the direct path alone, recomputed from the same random draws
    torch.manual_seed(0)
    x_g, _ = orig(gen, batch(256), 1, grad=False)
    sigma = obj.sample_sigmas(256, "cpu")
    x_t = x_g + sigma[:, None] * torch.randn_like(x_g)
    x0_real, x0_fake = obj.teacher(x_t, sigma), obj.fake_score(x_t, sigma)
    omega = (x_g - x0_real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grads[False], -(x0_real - x0_fake) / omega, rtol=1e-4, atol=1e-6)
    assert grads[True].abs().sum() > 0 and grads[False].abs().sum() > 0
    assert not torch.allclose(grads[True], grads[False], rtol=0.05, atol=1e-4)


def test_sigma_range_of_the_generator_loss():
    s = truncated_karras_sigmas(200_000, 800.0, 0.002, 80.0, 7.0)
    assert s.min() >= 0.002 - 1e-6 and s.max() <= 24.41 + 0.01
    assert s.max() > 23.0 and s.min() < 0.003  # both ends are reached
    one = truncated_karras_sigmas(10, 1000.0, 0.002, 80.0)
    assert one.max() <= 80.0 + 1e-3


def test_no_gradient_reaches_teacher_or_fake_parameters_in_the_generator_update(tmp_path):
    """Through the trainer's own freezing (a UNet teacher and fake score inside the generator's graph): after the
    generator update's backward the fake score's and the teacher's parameters hold no .grad, the generator's do,
    and the gradient reached x_g through both networks (it differs from the detached-x_t one)."""
    from diffdistill.training.builders import build_trainer
    from tests.helpers import TINY, compose_train

    cfg = compose_train(
        ["objective=sid", *TINY, f"run_dir={tmp_path}", "student.sigma_init=2.5", "trainer.checkpoint_every=0"]
    )
    trainer = build_trainer(cfg)
    obj = trainer.objective
    trainer._set_trainable(trainer.generator_roles)
    # the fake score must differ from the teacher, else the SiD gradient is exactly zero
    with torch.no_grad():
        for p in trainer.roles["fake_score"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    (v, mb), *_ = trainer._micro_batches()
    grads = {}
    for through in (True, False):
        obj.score_gradients = through
        for p in trainer.roles["generator"].parameters():
            p.grad = None
        torch.manual_seed(1)
        obj.generator_loss(mb, 1).loss.mean().backward()
        assert all(p.grad is None for p in trainer.roles["fake_score"].parameters())
        assert all(p.grad is None for p in trainer.teacher.parameters())
        grads[through] = torch.cat([p.grad.flatten() for p in trainer.roles["generator"].parameters()])
        assert grads[through].abs().sum() > 0
    assert not torch.allclose(grads[True], grads[False])
    # and the critic update trains the fake score only
    trainer._set_trainable(trainer.critic_roles)
    obj.critic_loss(mb, 1).loss.mean().backward()
    assert any(p.grad is not None for p in trainer.roles["fake_score"].parameters())


def test_teacher_keeps_parameters_frozen_with_differentiable_inputs():
    teacher = Teacher(GaussianDenoiser(torch.full((D,), MU), torch.full((D,), S), trainable=True))
    x = torch.randn(4, D, requires_grad=True)
    teacher(x, torch.full((4,), 0.5)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_normalised_sid_with_exact_fake_converges_to_data():
    """With omega and SiD's sigma sampler, alpha = 1.2 drives (a, b) -> (0.8, 0.3) (exact fake each step)."""
    torch.manual_seed(0)
    teacher, gen, _, _ = setup()
    opt = torch.optim.Adam(gen.parameters(), lr=0.01, betas=(0.0, 0.999))
    for _ in range(300):
        den = gen.denoiser
        fake = FakeScore(GaussianDenoiser(den.b.detach().clone(), den.a.detach().abs().clone()))
        out = SiD(teacher, gen, fake).generator_loss(batch(256), 1)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    assert gen.denoiser.a.abs().mean().item() == pytest.approx(0.8, abs=0.03)
    assert gen.denoiser.b.mean().item() == pytest.approx(0.3, abs=0.03)


def test_non_finite_samples_are_dropped_and_the_gradient_sanitised():
    """A teacher output that is NaN for one sample (and NaN in its backward): that sample's loss is 0, the others
    are unchanged, and the generator's gradient stays finite."""
    torch.manual_seed(0)
    _, gen, _, obj = setup()
    clean = obj.generator_loss(batch(8), 1).loss.detach()
    scores = obj.scores

    def poisoned(x_t, sigma, b):
        x0_real, x0_fake = scores(x_t, sigma, b)
        factor = torch.ones_like(x0_real)
        factor[0] = float("nan")
        return x0_real * factor, x0_fake  # forward and backward of sample 0 are NaN

    obj.scores = poisoned
    torch.manual_seed(0)
    out = obj.generator_loss(batch(8), 1)
    assert out.loss[0] == 0 and out.logs["sid_dropped"] == 1.0
    torch.testing.assert_close(out.loss[1:].detach(), clean[1:])
    out.loss.mean().backward()
    assert torch.isfinite(gen.denoiser.a.grad).all() and torch.isfinite(gen.denoiser.b.grad).all()


def test_fake_score_loss_is_edm_weighted_and_trains_the_fake_only():
    torch.manual_seed(0)
    _, gen, fake, obj = setup()
    out = obj.critic_loss(batch(32), 0)
    assert out.loss.shape == (32,) and torch.isfinite(out.loss).all()
    out.loss.mean().backward()
    assert fake.denoiser.mean.grad is not None and gen.denoiser.a.grad is None


def test_update_schedule_is_one_to_one_with_the_fake_score_first():
    _, _, _, obj = setup()
    s = obj.update_schedule
    assert [s.is_generator_step(i) for i in range(5)] == [False, True, True, True, True]


def test_pass_count_is_about_4_3x_and_grows_with_guidance_and_checkpointing():
    _, _, _, obj = setup()
    assert obj.pass_count().cost() / 3 == pytest.approx(13 / 3)
    assert setup(checkpoint_scores=True)[3].pass_count().cost() == pytest.approx(15.0)  # + teacher, fake recompute


def mixture_setup(**kw):
    den = GaussianMixtureDenoiser(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), 0.3)
    teacher = Teacher(den)
    gen = Generator(AffineDenoiser(2, 0.5, 0.1), sigma_init=2.5)
    fake = FakeScore(GaussianMixtureDenoiser(torch.tensor([[0.8, 0.1], [-0.7, 0.2]]), 0.4))
    return teacher, gen, fake, SiD(teacher, gen, fake, **kw)


def test_lsg_guides_the_fake_score_with_its_own_null_class():
    teacher, _, fake, _ = mixture_setup()
    x, sigma = torch.randn(6, 2), torch.full((6,), 0.8)
    cond = Conditioning(class_labels=torch.tensor([0, 1, 0, 1, 0, 1]))
    x0_c, x0_u = fake(x, sigma, cond), fake(x, sigma, cond.with_null_class(2))
    torch.testing.assert_close(guided_denoise(fake, x, sigma, cond, 3.0), x0_u + 3.0 * (x0_c - x0_u))
    torch.testing.assert_close(guided_denoise(fake, x, sigma, cond, 1.0), x0_c)
    torch.testing.assert_close(guided_denoise(teacher, x, sigma, cond, 3.0), teacher(x, sigma, cond, 3.0))


def test_lsg_same_guidance_on_both_scores_of_equal_networks_gives_zero_loss():
    """fake = teacher with kappa_2 = kappa_4 gives 0; different scales (the LSG 'long and short' split) do not."""
    teacher, gen, _, _ = mixture_setup()
    fake = FakeScore(teacher.denoiser)
    labelled = Batch(torch.zeros(16, 2), Conditioning(class_labels=torch.arange(16) % 2))
    same = SiD(teacher, gen, fake, real_guidance_scale=2.0, fake_guidance_scale=2.0)
    assert torch.count_nonzero(same.generator_loss(labelled, 1).loss) == 0
    split = SiD(teacher, gen, fake, real_guidance_scale=2.0, fake_guidance_scale=1.0)
    assert torch.count_nonzero(split.generator_loss(labelled, 1).loss) > 0
    assert split.pass_count().cost() > SiD(teacher, gen, fake).pass_count().cost()


def test_few_step_sid_trains_the_output_of_a_random_step():
    """k = 3: each update trains one step j ~ U{1..3}; only that student call builds a graph."""
    teacher = Teacher(GaussianDenoiser(torch.full((D,), MU), torch.full((D,), S)))
    gen = Generator(AffineDenoiser(D, 0.5, -0.2), sigma_init=2.5, sampling_sigmas=[2.5, 1.0, 0.3])
    fake = FakeScore(GaussianDenoiser(torch.full((D,), 0.0), torch.full((D,), 0.6), trainable=True))
    obj = SiD(teacher, gen, fake, num_steps=3)
    calls = []
    denoise = gen.denoise

    def counting(x, sigma, cond=None):
        out = denoise(x, sigma, cond)
        calls.append((float(sigma[0]), out.requires_grad))
        return out

    gen.denoise = counting
    steps = []
    for seed in range(30):
        torch.manual_seed(seed)
        calls.clear()
        out = obj.generator_loss(batch(8), 1)
        j = int(out.logs["student_step"])
        steps.append(j)
        assert [s for s, _ in calls] == pytest.approx([2.5, 1.0, 0.3][:j])
        assert [g for _, g in calls] == [False] * (j - 1) + [True]
    assert set(steps) == {1, 2, 3}
    assert obj.pass_count().forward == pytest.approx(1.0 + 2 * 1.0)  # mean 1 extra no-grad call in each update
    with pytest.raises(ValueError, match="student.sampling_sigmas"):
        SiD(teacher, Generator(AffineDenoiser(D), sigma_init=2.5), fake, num_steps=3)


def test_activation_checkpointing_gives_the_same_gradient(tmp_path):
    from diffdistill.training.builders import build_experiment
    from tests.helpers import TINY, compose_train

    exp = build_experiment(compose_train(["objective=sid", *TINY, f"run_dir={tmp_path}", "student.sigma_init=2.5"]))
    obj, gen = exp.objective, exp.roles["generator"]
    with torch.no_grad():
        for p in exp.roles["fake_score"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    mb = exp.dataset.get(torch.arange(4))
    grads = []
    for ck in (False, True):
        obj.checkpoint_scores = ck
        gen.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        obj.generator_loss(mb, 1).loss.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in gen.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_sigma_init_far_from_the_papers_warns():
    teacher = Teacher(GaussianDenoiser(torch.full((D,), MU), torch.full((D,), S)))
    fake = FakeScore(GaussianDenoiser(torch.zeros(D), torch.ones(D), trainable=True))
    want = round(2.5 * teacher.sigma_data / 0.5, 3)  # SiD's 2.5 at sigma_data 0.5, carried to this teacher's data
    with pytest.warns(UserWarning, match=f"set student.sigma_init={want}") as record:
        SiD(teacher, Generator(AffineDenoiser(D), sigma_init=80.0), fake)
    assert sum("sigma_init" in str(w.message) for w in record) == 1
    with pytest.warns(UserWarning, match="set student.sigma_init=2.5 "):
        SiD(teacher, Generator(AffineDenoiser(D), sigma_init=80.0), fake, match_sigma_data=False)
    import warnings

    with warnings.catch_warnings(record=True) as quiet:  # the paper's sigma_init 2.5: no warning
        warnings.simplefilter("always")
        SiD(teacher, Generator(AffineDenoiser(D), sigma_init=2.5), fake)
    assert not [w for w in quiet if "sigma_init" in str(w.message)]


@pytest.mark.parametrize("key,value", [("t_max", 0.0), ("t_max", 1200.0), ("P_std", 0.0), ("num_steps", 0)])
def test_bad_hyperparameters_fail_naming_the_key(key, value):
    teacher, gen, fake, _ = setup()
    with pytest.raises(ValueError, match=key):
        SiD(teacher, gen, fake, **{key: value})


def test_toy_run_reaches_the_true_distribution(tmp_path):
    """experiment=toy/sid through the trainer (trained exact-family fake score, 1:1, Adam betas (0, 0.999))."""
    from diffdistill.training.builders import build_trainer
    from tests.helpers import compose_train

    cfg = ["experiment=toy/sid", "trainer.device=cpu", f"run_dir={tmp_path}", "logger=none"]
    cfg.append("trainer.checkpoint_every=0")
    trainer = build_trainer(compose_train(cfg))
    trainer.fit()
    ema = trainer.emas[0.9].module.denoiser
    assert ema.a.abs().mean().item() == pytest.approx(S, abs=0.02)
    assert ema.b.mean().item() == pytest.approx(MU, abs=0.025)
