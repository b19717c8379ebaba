"""DMD2 invariants (docs/invariants.md §5): the DM gradient in float64 with per-sample masking, the GAN branch
through the frozen fake score, TTUR counts, backward simulation, DMD v1's regression pairs, the toy run."""

import math

import pytest
import torch

from diffdistill.models import Conditioning, FakeScore, GaussianDenoiser, Generator, Teacher
from diffdistill.models.analytic import AffineDenoiser
from diffdistill.models.conditioning import Batch
from diffdistill.models.discriminator import Discriminator
from diffdistill.objectives.common import backward_simulation
from diffdistill.objectives.dmd import DMD, dmd_gradient
from diffdistill.objectives.dmd2 import DMD2
from diffdistill.training.builders import build_experiment, build_trainer
from tests.helpers import TINY, compose_train

MU, S, D = 0.3, 0.8, 16


def toy(a=0.5, b=-0.2, sigmas=None, **kw):
    teacher = Teacher(GaussianDenoiser(torch.full((D,), MU), torch.full((D,), S)))
    gen = Generator(AffineDenoiser(D, a, b), sigma_init=80.0, sampling_sigmas=sigmas)
    fake = FakeScore.from_teacher(teacher)
    disc = Discriminator.for_network(None, ["input"], "mlp", 8, (D,), 0.5)
    heads = {"network": "none", "taps": ["input"], "head": "mlp", "hidden": 8}
    return DMD2(teacher, gen, fake, disc, discriminator_heads=heads, **kw)


def real_batch(n):
    return Batch(MU + S * torch.randn(n, D), Conditioning())


def test_fake_equals_real_gives_zero_dm_gradient():
    """With the fake score equal to the teacher and the GAN term off, loss and gradient are exactly 0."""
    obj = toy(gan_generator_weight=0.0)
    out = obj.generator_loss(real_batch(64), 0)
    assert torch.count_nonzero(out.loss) == 0
    out.loss.mean().backward()
    den = obj.generator.denoiser
    assert torch.count_nonzero(den.a.grad) == 0 and torch.count_nonzero(den.b.grad) == 0


def test_float64_gradient_masks_whole_samples_and_matches_float32():
    torch.manual_seed(0)
    x, real, fake = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    fake[1, 0, 2, 2] = float("nan")
    g64 = dmd_gradient(x, real, fake, float64=True)
    g32 = dmd_gradient(x, real, fake)
    assert g64.dtype == torch.float32
    assert torch.count_nonzero(g64[1]) == 0  # the whole sample, not just the NaN element
    assert torch.count_nonzero(g32[1]) == g32[1].numel() - 1  # (DMD v1 zeroes elements)
    torch.testing.assert_close(g64[[0, 2]], g32[[0, 2]], rtol=1e-6, atol=1e-7)


def test_unnormalised_float64_gradient_equals_kl_gradient():
    """E[(x0_fake - x0_real)/sigma^2 dx/dtheta] = grad KL(q_sigma || p_sigma): -0.2332 (a), -0.4425 (b)."""
    a, b, sigma, n = 0.5, -0.2, 0.7, 400_000
    torch.manual_seed(0)
    z = torch.randn(n, 1)
    x = a * z + b
    x_t = x + sigma * torch.randn_like(x)
    sig = torch.full((n,), sigma)
    real = GaussianDenoiser(torch.tensor([MU]), torch.tensor([S]))(x_t, sig)
    fake = GaussianDenoiser(torch.tensor([b]), torch.tensor([a]))(x_t, sig)
    g = dmd_gradient(x, real, fake, normalize=False, float64=True) / sigma**2
    grad_a, grad_b = float((g * z).mean()), float(g.mean())
    R, A = S**2 + sigma**2, a**2 + sigma**2
    assert grad_a == pytest.approx(a * (1 / R - 1 / A), abs=3e-3)
    assert grad_b == pytest.approx((b - MU) / R, abs=3e-3)


def test_ttur_counts(tmp_path):
    """In N iterations at ratio 5 the generator is updated ceil(N / 5) times, the critics N times."""
    trainer = build_trainer(
        compose_train(["experiment=toy/dmd2", "trainer.device=cpu", "logger=none", f"run_dir={tmp_path}"])
    )
    assert trainer.critic_roles == ("fake_score", "discriminator")
    n, gen, crit = 12, 0, 0
    for _ in range(n):
        logs = trainer.train_step()
        gen += "generator_loss" in logs
        crit += "critic_loss" in logs
    assert (gen, crit) == (math.ceil(n / 5), n)


def test_backward_simulation_feeds_the_gradient_only_through_the_last_step():
    """k' student calls, the first k'-1 without a graph: d x0 / d a is x_last / sigma_last (the last call's input)."""
    den = AffineDenoiser(D, 0.7, 0.1)
    inputs, graphs = [], []

    def denoise(x, sigma, cond):
        out = den(x, sigma, cond)
        inputs.append((x.detach(), sigma))
        graphs.append(out.requires_grad)
        return out

    sigmas = [80.0, 10.0, 1.0, 0.1]
    z = torch.randn(5, D)
    x0, sigma = backward_simulation(
        denoise, 80.0 * z, torch.full((5,), 80.0), 4, None, lambda i, s: torch.full_like(s, sigmas[i + 1])
    )
    assert graphs == [False, False, False, True] and float(sigma[0]) == pytest.approx(0.1)
    x0.sum().backward()
    x_last, s_last = inputs[-1]
    torch.testing.assert_close(den.a.grad, (x_last / s_last[:, None]).sum(0))
    # the last input is the previous output re-noised: x_last = x0_prev + 0.1 eps
    prev = den.a.detach() * inputs[-2][0] / inputs[-2][1][:, None] + den.b.detach()
    assert (x_last - prev).std() == pytest.approx(0.1, rel=0.2)


def test_dmd2_draws_its_simulation_length_per_iteration():
    obj = toy(sigmas=[80.0, 10.0, 1.0, 0.1])
    steps = [obj.simulation_steps(s) for s in range(400)]
    assert set(steps) == {1, 2, 3, 4} and steps == [obj.simulation_steps(s) for s in range(400)]
    assert (
        toy().simulation_steps(3) == 1 and toy(sigmas=[80.0, 1.0], backward_simulation=False).simulation_steps(5) == 1
    )


def test_generator_update_changes_only_the_generator_and_the_gan_gradient_goes_through_the_fake_score(tmp_path):
    """Through the trainer on the tiny UNet: in the generator update neither the fake score nor the heads
    change; the GAN term alone (DM gradient 0: fake = teacher at step 0) moves the generator."""
    overrides = ["objective=dmd2", *TINY, f"run_dir={tmp_path}", "logger=none", "optim.lr=1e-3", "optim.warmup_steps=0"]
    trainer = build_trainer(compose_train(overrides))
    before = {r: [p.detach().clone() for p in trainer.roles[r].parameters()] for r in trainer.objective.roles}
    micro = trainer._micro_batches()
    trainer._set_trainable(trainer.generator_roles)
    logs = trainer._update(
        trainer.generator_roles, "generator", lambda b: trainer.objective.generator_loss(b, 0), micro
    )
    assert logs["dm_grad_norm"] == 0.0 and logs["generator_grad_norm"] > 0
    for role in ("fake_score", "discriminator"):
        assert all(torch.equal(p, q) for p, q in zip(trainer.roles[role].parameters(), before[role])), role
    assert any(not torch.equal(p, q) for p, q in zip(trainer.roles["generator"].parameters(), before["generator"]))
    # the critic update trains the fake score and the heads (the GAN loss reaches both)
    trainer._set_trainable(trainer.critic_roles)
    logs = trainer._update(trainer.critic_roles, "critic", lambda b: trainer.objective.critic_loss(b, 0), micro)
    assert logs["fake_score_grad_norm"] > 0 and logs["discriminator_grad_norm"] > 0


def test_discriminator_heads_sit_on_the_fake_score_bottleneck_and_are_not_in_its_checkpoint(tmp_path):
    exp = build_experiment(compose_train(["objective=dmd2", *TINY, f"run_dir={tmp_path}"]))
    disc, fake = exp.roles["discriminator"], exp.roles["fake_score"]
    assert exp.objective.feature_network is fake and disc.taps == [-1] and disc.tap_shapes == [[16, 4, 4]]
    fake_tensors = {p.data_ptr() for p in fake.parameters()}
    assert not fake_tensors & {p.data_ptr() for p in disc.parameters()}


def test_real_data_only_with_the_gan_term():
    assert toy().requires_real_data
    obj = toy(gan_discriminator_weight=0.0)
    assert not obj.requires_real_data
    out = obj.critic_loss(Batch(None, Conditioning(class_labels=torch.zeros(4, dtype=torch.long))), 1)
    assert out.loss.shape == (4,) and "gan_discriminator" not in out.logs


def test_r1_in_the_critic_update():
    for kind in ("exact", "approx"):
        out = toy(r1_weight=1.0, r1_kind=kind).critic_loss(real_batch(8), 1)
        assert out.logs["r1"] > 0


def test_bad_settings_name_their_key(tmp_path):
    base = ["objective=dmd2", *TINY, f"run_dir={tmp_path}"]
    with pytest.raises(ValueError, match="discriminator_heads"):
        build_experiment(compose_train([*base, "+objective.discriminator_heads.depth=3"]))
    with pytest.raises(ValueError, match="gan_loss"):
        build_experiment(compose_train([*base, "objective.gan_loss=wgan"]))
    with pytest.raises(ValueError, match="discriminator_heads.network"):
        build_experiment(compose_train([*base, "objective.discriminator_heads.network=vae"]))


def test_pass_count_counts_the_gan_passes(tmp_path):
    """On the tiny UNet at 5:1: the generator's GAN term adds a fake-score feature fwd+bwd every 5th iteration, the
    discriminator one of the real half (fused) or of [generated; real] (2B) every iteration; the toy's input-tap
    heads add none."""
    base = ["objective=dmd2", *TINY, f"run_dir={tmp_path}"]
    on = build_experiment(compose_train(base)).objective.pass_count()
    off_cfg = [*base, "objective.gan_generator_weight=0", "objective.gan_discriminator_weight=0"]
    off = build_experiment(compose_train(off_cfg)).objective.pass_count()
    f = 0.25  # UNetBackbone.feature_pass_cost: the features stop after the mid block
    # fused (the default): the generated half's taps come with the fake-score loss's forward, the real half is one pass
    assert on.forward_grad - off.forward_grad == pytest.approx(f / 5 + f)
    assert on.backward - off.backward == pytest.approx(f / 5 + f)
    apart = build_experiment(compose_train([*base, "objective.fuse_critic_passes=false"])).objective.pass_count()
    assert apart.forward_grad - off.forward_grad == pytest.approx(f / 5 + 2 * f)
    assert apart.backward - off.backward == pytest.approx(f / 5 + 2 * f)
    assert toy().pass_count() == toy(gan_generator_weight=0.0, gan_discriminator_weight=0.0).pass_count()


def test_dmd_regression_pairs_are_made_once_and_regress_onto_the_teacher(tmp_path):
    """DMD v1 (Eq. 9): pairs (z, ODE_teacher(z)) generated once with a private seed (cached to a file); the
    regression pulls the one-step student onto them. With the exact Gaussian teacher the ODE map is affine,
    x0 = mu + s (sigma_max z - mu) / sqrt(s^2 + sigma_max^2), so the regression alone drives (a, b) to (0.8, 0.3)."""
    teacher = Teacher(GaussianDenoiser(torch.full((D,), MU), torch.full((D,), S)))
    gen = Generator(AffineDenoiser(D, 0.5, -0.2), sigma_init=80.0)
    cache = tmp_path / "pairs.pt"
    kw = dict(regression_weight=1.0, regression_pairs=256, regression_steps=80, regression_distance="l2")
    obj = DMD(teacher, gen, FakeScore.from_teacher(teacher), regression_cache=str(cache), **kw)
    state = torch.random.get_rng_state()
    obj.pairs.generate(teacher, (D,), "cpu")
    assert torch.equal(torch.random.get_rng_state(), state)  # a private generator: training streams untouched
    z, x0 = obj.pairs.pairs["z"], obj.pairs.pairs["x0"]
    exact = MU + S / math.sqrt(S**2 + 80.0**2) * (80.0 * z - MU)  # the exact PF-ODE map from sigma_max to 0
    torch.testing.assert_close(x0, exact, atol=1e-2, rtol=0)
    assert cache.exists()
    again = DMD(teacher, gen, FakeScore.from_teacher(teacher), regression_cache=str(cache), **kw)
    again.pairs.generate(teacher, (D,), "cpu")
    assert torch.equal(again.pairs.pairs["x0"], x0)
    opt = torch.optim.SGD(gen.parameters(), lr=2.0)
    for _ in range(300):
        opt.zero_grad()
        obj.regression_loss(256, "cpu").mean().backward()
        opt.step()
    assert float(gen.denoiser.a.mean()) == pytest.approx(S, abs=0.02)
    assert float(gen.denoiser.b.mean()) == pytest.approx(MU, abs=0.02)


def test_dmd2_regression_option_adds_dmd_v1_term_on_the_same_pairs():
    """DMD2 drops DMD v1's regression (Eq. 9); as an option it adds exactly ``weight * regression_loss`` to the
    generator loss (same seed, same pairs) and counts one more G fwd+bwd per generator update."""
    kw = dict(regression_pairs=64, regression_steps=8, regression_distance="l2", gan_generator_weight=1e-2)
    plain, reg = toy(**kw), toy(regression_weight=0.5, **kw)
    reg.generator.load_state_dict(plain.generator.state_dict())
    reg.discriminator.load_state_dict(plain.discriminator.state_dict())
    torch.manual_seed(3)
    base = plain.generator_loss(real_batch(32), 0)
    torch.manual_seed(3)
    both = reg.generator_loss(real_batch(32), 0)
    assert "regression_loss" in both.logs and "regression_loss" not in base.logs
    # the regression draws its pairs after the DM and GAN noise, so both calls share those draws
    extra = both.loss.mean() - base.loss.mean()
    assert float(extra) == pytest.approx(0.5 * both.logs["regression_loss"], rel=1e-5)
    assert reg.pass_count().forward_grad == pytest.approx(plain.pass_count().forward_grad + 1 / 5)
    assert reg.pass_count().backward == pytest.approx(plain.pass_count().backward + 1 / 5)
    with pytest.raises(ValueError, match="regression_weight"):
        toy(regression_weight=-1.0)


@pytest.mark.slow
def test_toy_recipe_reaches_the_true_distribution(tmp_path):
    """experiment=toy/dmd2 (GAN term on, 5:1): |a| -> 0.8, b -> 0.3 (measured 0.803 / 0.299 in 600 iterations)."""
    trainer = build_trainer(
        compose_train(["experiment=toy/dmd2", "trainer.device=cpu", "logger=none", f"run_dir={tmp_path}"])
    )
    trainer.fit()
    den = trainer.roles["generator"].denoiser
    assert float(den.a.abs().mean()) == pytest.approx(S, abs=0.02)
    assert float(den.b.mean()) == pytest.approx(MU, abs=0.02)


def test_fused_critic_equals_its_two_pass_form_and_falls_back_where_it_cannot_fuse(tmp_path):
    """``fuse_critic_passes``: one noised x_t for the fake-score loss and the generated half of D; the loss and its
    gradients equal the same terms built from separate passes (a forward and a ``features`` call) on the same draws.
    The fusion needs the heads on the fake score and the GAN's noise law equal to the fake-score loss's."""
    from diffdistill.models.backbones import denoise_with_features
    from diffdistill.objectives import gan
    from diffdistill.objectives.common import add_noise, karras_index_sigmas, weighted_denoising_error

    base = ["objective=dmd2", *TINY, f"run_dir={tmp_path}"]
    exp = build_experiment(compose_train(base))
    obj, fake, disc = exp.objective, exp.roles["fake_score"], exp.roles["discriminator"]
    assert obj.fuses_critic_passes
    n = 4
    torch.manual_seed(3)
    x = torch.randn(n, *exp.roles["generator"].sample_shape)
    cond = Conditioning(class_labels=torch.arange(n) % 2)
    x_real = torch.randn_like(x)
    params = [p for m in (fake, disc) for p in m.parameters() if p.requires_grad]

    batch = Batch(x_real, cond)
    batch.scratch["dmd_generated"] = (x, cond)
    torch.manual_seed(11)
    out = obj.critic_loss(batch, 1)
    g_fused = torch.autograd.grad(out.loss.mean(), params)

    torch.manual_seed(11)  # the same draws, in the same order, through separate passes
    sigma = karras_index_sigmas(obj.sigmas, n, 0, len(obj.sigmas) - 1, x.device)
    x_t, _ = add_noise(x, sigma)
    x_real_t, _ = add_noise(x_real, sigma)
    dsm = weighted_denoising_error(fake(x_t, sigma, cond), x, sigma, fake.sigma_data, obj.fake_weighting)
    d = gan.discriminator_loss(disc(fake, x_real_t, sigma, cond), disc(fake, x_t, sigma, cond), obj.gan_loss)
    ref = dsm + obj.gan_discriminator_weight * d
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-7)
    g_ref = torch.autograd.grad(ref.mean(), params)
    scale = max(float(b.abs().max()) for b in g_ref)
    for a, b in zip(g_fused, g_ref):  # equal up to the float rounding of a different batching
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * scale)
    out2, taps = denoise_with_features(fake, x_t, sigma, cond)
    assert len(taps) == len(fake.features(x_t, sigma, cond))

    for extra in (
        "objective.fuse_critic_passes=false",
        "objective.gan_max_step_percent=0.5",
        "objective.discriminator_heads.network=teacher",
    ):
        other = build_experiment(compose_train([*base, extra])).objective
        assert not other.fuses_critic_passes, extra
        loss = other.critic_loss(Batch(x_real, cond, scratch={"dmd_generated": (x, cond)}), 1).loss
        assert loss.shape == (n,) and torch.isfinite(loss).all()
