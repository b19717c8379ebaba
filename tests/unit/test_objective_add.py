"""ADD and LADD (docs/invariants.md): hinge losses at zero logits, R1 of a constant discriminator, ADD's
distillation gradient against its closed form on the Gaussian toy, the student's noised-data inputs, LADD's
logit-normal re-noising and teacher-generated data, the update schedule, the gradient path through the frozen
teacher's features, pass counts and errors that name their key."""

import math

import pytest
import torch

from diffdistill.models import Conditioning, GaussianDenoiser, Generator, Teacher
from diffdistill.models.analytic import AffineDenoiser
from diffdistill.models.conditioning import Batch
from diffdistill.models.discriminator import Discriminator
from diffdistill.objectives.add import ADD, LADD, distill_weight_c
from diffdistill.training.builders import build_experiment, build_trainer
from tests.helpers import TINY, compose_train

MU, S, D = 0.3, 0.8, 16
HEADS = {"network": "none", "taps": ["input"], "head": "mlp", "hidden": 8}


def toy(cls=ADD, sigmas=None, **kw):
    teacher = Teacher(GaussianDenoiser(torch.full((D,), MU), torch.full((D,), S)))
    gen = Generator(AffineDenoiser(D, 0.5, -0.2), sigma_init=80.0, sampling_sigmas=sigmas)
    disc = Discriminator.for_network(None, ["input"], "mlp", 8, (D,), 0.5)
    kw.setdefault("discriminator_heads", HEADS)
    return cls(teacher, gen, disc, **kw)


def real_batch(n):
    return Batch(MU + S * torch.randn(n, D), Conditioning())


def zero_logits(obj):
    """Make the heads output exactly 0 (a constant discriminator)."""
    last = obj.discriminator.heads[0].net[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)


@pytest.mark.parametrize("cls", [ADD, LADD])
def test_hinge_losses_at_zero_logits_and_r1_of_a_constant_discriminator(cls):
    """At zero logits the hinge D-loss is 2 per sample and the hinge G-loss 0; R1 of a constant D is 0."""
    kw = {"r1_weight": 1.0} if cls is ADD else {"r1_weight": 1.0, "data": "real"}
    obj = toy(cls, **kw)
    zero_logits(obj)
    torch.manual_seed(0)
    batch = real_batch(32)
    g = obj.generator_loss(batch, 0)
    assert g.logs["gan_generator"] == 0.0
    c = obj.critic_loss(batch, 0)
    torch.testing.assert_close(c.loss, torch.full((32,), 2.0))
    assert c.logs["r1"] == 0.0 and c.logs["gan_discriminator"] == pytest.approx(2.0)


def test_add_distillation_gradient_equals_its_closed_form_on_the_gaussian_toy():
    """d/dx of c(sigma) mean||x - sg(D*(x + sigma eps))||^2 is, in expectation over eps,
    2 c(sigma) (sigma^2 / (s^2 + sigma^2)) (x - mu) / D (the teacher's exact denoiser D*, c = 1 / sqrt(1 + sigma^2))."""
    obj = toy(distill_min_step_percent=0.5, distill_max_step_percent=0.5)
    sigma = float(obj.sigmas[obj.k_min])
    assert obj.k_min == obj.k_max == 500 and 1.0 < sigma < 10.0
    torch.manual_seed(0)
    n = 200_000
    x = (MU + 1.5 * torch.randn(n, D)).requires_grad_(True)
    loss, s = obj.distillation_loss(x, Conditioning())
    assert torch.all(s == sigma)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    c = 1.0 / math.sqrt(1.0 + sigma**2)
    R = S**2 + sigma**2
    expected = 2 * c * (sigma**2 / R) * (x.detach() - MU) / D
    # the per-sample gradient is the closed form plus zero-mean noise: regress one on the other
    slope = float((grad * (x.detach() - MU)).sum() / ((x.detach() - MU) ** 2).sum())
    assert slope == pytest.approx(2 * c * sigma**2 / R / D, rel=1e-2)
    assert float((grad - expected).mean()) == pytest.approx(0.0, abs=1e-4)
    torch.testing.assert_close(distill_weight_c(torch.tensor([0.0, 3.0]), "alpha"), torch.tensor([1.0, 0.1**0.5]))


def test_student_sees_data_noised_at_its_own_noise_levels():
    """x_s = x0 + sigma_s eps with sigma_s drawn from student.sampling_sigmas, per sample."""
    sigmas = [80.0, 17.5, 2.5, 0.17]
    obj = toy(sigmas=sigmas)
    seen = []
    den = obj.generator.denoiser
    forward = den.forward

    def spy(x, sigma, cond=None):
        seen.append((x.detach(), sigma.detach()))
        return forward(x, sigma, cond)

    den.forward = spy
    torch.manual_seed(0)
    x0 = MU + S * torch.randn(4000, D)
    obj.student_sample(x0, Conditioning())
    x_s, sigma_s = seen[-1]
    assert set(sigma_s.tolist()) == set(torch.tensor(sigmas).tolist())
    for s in sigmas:
        m = sigma_s == torch.tensor(s)
        assert ((x_s[m] - x0[m]) / s).std() == pytest.approx(1.0, rel=0.05)
    assert obj.few_step_student and not toy().few_step_student


def test_ladd_renoising_level_is_logit_normal():
    """u = sigma / (1 + sigma) is logit-normal(m, s): ln sigma ~ N(m, s^2) (clamped to the teacher's range)."""
    obj = toy(LADD, renoise_mean=1.0, renoise_std=1.0, data="real")
    torch.manual_seed(0)
    sigma = obj.discriminator_sigmas(200_000, "cpu")
    logit_u = torch.log(sigma / (1 + sigma)) - torch.log(1 / (1 + sigma))
    assert float(logit_u.mean()) == pytest.approx(1.0, abs=0.01)
    assert float(logit_u.std()) == pytest.approx(1.0, abs=0.01)
    assert float(sigma.min()) >= 0.002 - 1e-9 and float(sigma.max()) <= 80.0 + 1e-4
    # the heads see re-noised inputs: x + sigma eps
    x = torch.zeros(50_000, D)
    s = torch.full((50_000,), 2.0)
    assert float(obj.discriminator_inputs(x, s).std()) == pytest.approx(2.0, rel=0.02)


def test_ladd_synthetic_data_are_teacher_samples_and_need_no_dataset():
    """With data: synthetic the data side is the teacher's Heun samples: for the exact teacher its ODE map
    x0 = mu + s (sigma_max z - mu) / sqrt(s^2 + sigma_max^2), so ~N(mu, s^2); batches without real samples are fine."""
    obj = toy(LADD, synthetic_samples=4096, synthetic_steps=80)
    assert not obj.requires_real_data
    batch = Batch(None, Conditioning(class_labels=torch.zeros(8, dtype=torch.long)))
    x0, _ = obj.data(batch)
    z, pool = obj.synthetic.pairs["z"], obj.synthetic.pairs["x0"]
    assert float((pool - (MU + S * (80.0 * z - MU) / math.sqrt(S**2 + 80.0**2))).abs().max()) < 0.01
    assert x0.shape == (8, D) and pool.shape == (4096, D)
    assert float(pool.mean()) == pytest.approx(MU, abs=0.01)
    assert float(pool.std()) == pytest.approx(S, rel=0.01)
    out = obj.critic_loss(batch, 0)
    assert out.loss.shape == (8,)
    assert toy(LADD, data="real").requires_real_data and toy().requires_real_data


def test_ladd_generator_gradient_goes_through_the_frozen_teacher_features(tmp_path):
    """On the tiny UNet: one head per teacher tap; the generator update moves only the generator, the critic update
    only the heads; the teacher never changes."""
    overrides = ["objective=ladd", *TINY, f"run_dir={tmp_path}", "logger=none", "optim.lr=1e-3"]
    overrides += ["optim.warmup_steps=0", "objective.synthetic_samples=16", "objective.synthetic_steps=2"]
    trainer = build_trainer(compose_train(overrides))
    disc = trainer.roles["discriminator"]
    assert trainer.objective.feature_network is trainer.teacher and disc.taps == [0, 1, 2]
    teacher = [p.detach().clone() for p in trainer.teacher.parameters()]
    before = {r: [p.detach().clone() for p in trainer.roles[r].parameters()] for r in trainer.objective.roles}
    micro = trainer._micro_batches()
    trainer._set_trainable(trainer.generator_roles)
    logs = trainer._update(
        trainer.generator_roles, "generator", lambda b: trainer.objective.generator_loss(b, 0), micro
    )
    assert logs["generator_grad_norm"] > 0
    assert all(torch.equal(p, q) for p, q in zip(disc.parameters(), before["discriminator"]))
    trainer._set_trainable(trainer.critic_roles)
    logs = trainer._update(trainer.critic_roles, "critic", lambda b: trainer.objective.critic_loss(b, 0), micro)
    assert logs["discriminator_grad_norm"] > 0
    assert all(torch.equal(p, q) for p, q in zip(trainer.teacher.parameters(), teacher))


def test_update_schedule_from_config(tmp_path):
    """critic_steps_per_generator_step = 4: in N iterations the generator steps ceil(N / 4) times, the heads N."""
    overrides = ["objective=add", *TINY, f"run_dir={tmp_path}", "logger=none"]
    trainer = build_trainer(compose_train([*overrides, "objective.critic_steps_per_generator_step=4"]))
    n, gen, crit = 9, 0, 0
    for _ in range(n):
        logs = trainer.train_step()
        gen += "generator_loss" in logs
        crit += "critic_loss" in logs
    assert (gen, crit) == (math.ceil(n / 4), n)


def test_add_exact_r1_through_the_teacher_unet(tmp_path):
    """ADD's default R1 (exact, double backprop) runs through the teacher's attention blocks and trains the heads."""
    exp = build_experiment(compose_train(["objective=add", *TINY, f"run_dir={tmp_path}", "objective.r1_weight=1.0"]))
    obj = exp.objective
    out = obj.critic_loss(Batch(torch.randn(4, 1, 8, 8), Conditioning()), 0)
    assert out.logs["r1"] > 0
    out.loss.mean().backward()
    assert all(p.grad is not None for p in exp.roles["discriminator"].parameters())


def test_pass_counts(tmp_path):
    """On the tiny UNet (feature pass 0.25): ADD's distillation adds one no-grad teacher forward; LADD at 4:1 does
    a no-grad student call on 3 of 4 critic updates."""
    base = ["objective=add", *TINY, f"run_dir={tmp_path}"]
    on = build_experiment(compose_train(base)).objective.pass_count()
    off = build_experiment(compose_train([*base, "objective.distill_weight=0"])).objective.pass_count()
    assert on.forward - off.forward == pytest.approx(1.0)
    # G fwd + (x_hat features) + [generated; real] features + exact R1's data-half graph
    assert on.forward_grad == pytest.approx(1.0 + 0.25 + 0.5 + 0.25)
    ladd = ["objective=ladd", *TINY, f"run_dir={tmp_path}", "objective.critic_steps_per_generator_step=4"]
    p = build_experiment(compose_train(ladd)).objective.pass_count()
    assert p.forward == pytest.approx(3 / 4)
    assert p.forward_grad == pytest.approx((1.0 + 0.25) / 4 + 0.5)


def test_bad_settings_name_their_key(tmp_path):
    base = ["objective=add", *TINY, f"run_dir={tmp_path}"]
    with pytest.raises(ValueError, match="discriminator_heads.network=dinov2.*timm.*local"):
        build_experiment(compose_train([*base, "objective.discriminator_heads.network=dinov2"]))
    with pytest.raises(ValueError, match="discriminator_heads: unknown keys"):
        build_experiment(compose_train([*base, "+objective.discriminator_heads.depth=3"]))
    with pytest.raises(ValueError, match="objective.gan_loss"):
        build_experiment(compose_train([*base, "objective.gan_loss=wgan"]))
    with pytest.raises(ValueError, match="objective.distill_weighting"):
        build_experiment(compose_train([*base, "objective.distill_weighting=exp"]))
    with pytest.raises(ValueError, match="objective.data"):
        build_experiment(compose_train(["objective=ladd", *TINY, f"run_dir={tmp_path}", "objective.data=web"]))
    with pytest.raises(ValueError, match="network 'none' reads only the 'input' tap"):
        toy(discriminator_heads={"network": "none", "taps": [-1]})
    with pytest.raises(ValueError, match="needs real samples"):
        toy().generator_loss(Batch(None, Conditioning(class_labels=torch.zeros(2, dtype=torch.long))), 0)
