"""SiDA invariants: with the adversarial weights at 0 it is SiD exactly; the losses against hand computations (one
sigma and one noise for real and generated samples, the generator's CHW BCE / omega); the switch-on points; the GAN
gradient through the frozen fake score in the generator update, the heads trained only in the critic update."""

import pytest
import torch
import torch.nn.functional as F

from diffdistill.models import Conditioning, FakeScore, GaussianDenoiser, Generator, Teacher
from diffdistill.models.analytic import AffineDenoiser
from diffdistill.models.conditioning import Batch
from diffdistill.models.denoiser import edm_loss_weight
from diffdistill.models.discriminator import Discriminator
from diffdistill.objectives.sid import SiD
from diffdistill.objectives.sida import SiDA
from diffdistill.training.builders import build_experiment, build_trainer
from tests.helpers import TINY, compose_train

MU, S, D = 0.3, 0.8, 16
HEADS = {"network": "none", "taps": ["input"], "head": "mlp", "hidden": 8}


def roles(a=0.5, b=-0.2, fake_is_teacher=False):
    torch.manual_seed(0)
    teacher = Teacher(GaussianDenoiser(torch.full((D,), MU), torch.full((D,), S)))
    gen = Generator(AffineDenoiser(D, a, b), sigma_init=2.5)
    if fake_is_teacher:
        fake = FakeScore.from_teacher(teacher)
    else:
        fake = FakeScore(GaussianDenoiser(torch.full((D,), b), torch.full((D,), abs(a)), trainable=True))
    disc = Discriminator.for_network(None, ["input"], "mlp", 8, (D,), 0.5)
    return teacher, gen, fake, disc


def sida(fake_is_teacher=False, **kw):
    teacher, gen, fake, disc = roles(fake_is_teacher=fake_is_teacher)
    return SiDA(teacher, gen, fake, disc, discriminator_heads=HEADS, **kw)


def real_batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(MU + S * torch.randn(n, D, generator=g), Conditioning())


def test_adversarial_weights_at_zero_give_sid_exactly():
    """Losses and gradients bit for bit equal to SiD's under the same seed, in both updates."""
    teacher, gen, fake, _ = roles()
    ref = SiD(teacher, gen, fake, alpha=1.0)
    obj = sida(gan_generator_weight=0.0, gan_discriminator_weight=0.0)
    assert not obj.requires_real_data
    for kind in ("generator_loss", "critic_loss"):
        outs, grads = [], []
        for o in (ref, obj):
            torch.manual_seed(7)
            out = getattr(o, kind)(real_batch(64), 3)
            net = o.generator if kind == "generator_loss" else o.fake_score
            net.zero_grad()
            out.loss.mean().backward()
            outs.append(out.loss.detach())
            grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
        assert torch.equal(outs[0], outs[1]), kind
        assert grads[0] and all(torch.equal(g, h) for g, h in zip(*grads)), kind
    assert ref.pass_count() == obj.pass_count()


def test_critic_loss_uses_one_sigma_and_one_noise_for_real_and_generated():
    """Fake-score loss + lambda(sigma) / 2 [softplus(-D(x_real + sigma n)) + softplus(D(x_g + sigma n))], redone by
    hand from the same random draws (generator noise, ln sigma, n)."""
    obj = sida(gan_discriminator_weight=0.7)
    batch = real_batch(32)
    torch.manual_seed(3)
    out = obj.critic_loss(batch, 0)
    torch.manual_seed(3)
    with torch.no_grad():
        z = torch.randn(32, D)
        x_g = obj.generator(z)  # G(sigma_init z, sigma_init)
        sigma = (obj.P_mean + 1.2 * torch.randn(32)).exp()  # SiD's -1.2, shifted to the teacher's sigma_data
        n = torch.randn(32, D)
        x_fake_t, x_real_t = x_g + sigma[:, None] * n, batch.x0 + sigma[:, None] * n
        lam = edm_loss_weight(sigma, float(obj.fake_score.sigma_data))
        dsm = lam * (obj.fake_score(x_fake_t, sigma) - x_g).pow(2).sum(1)
        l_fake = obj.discriminator(None, x_fake_t, sigma).mean(1)
        l_real = obj.discriminator(None, x_real_t, sigma).mean(1)
        d = 0.5 * lam * (F.softplus(-l_real) + F.softplus(l_fake))
    torch.testing.assert_close(out.loss, dsm + 0.7 * d, rtol=1e-5, atol=1e-5)
    assert out.logs["gan_discriminator"] == pytest.approx(float(d.mean()), rel=1e-5)


def test_generator_gan_term_is_chw_bce_over_omega_at_sids_x_t():
    """fake = teacher (SiD loss 0): the generator loss is gan_generator_weight CHW softplus(-clamp(D(x_t))) / omega."""
    obj = sida(fake_is_teacher=True, gan_generator_weight=0.02)
    batch = real_batch(32)
    torch.manual_seed(5)
    out = obj.generator_loss(batch, 1)
    torch.manual_seed(5)
    with torch.no_grad():
        x_g = obj.generator(torch.randn(32, D))
        sigma = obj.sample_sigmas(32, "cpu")
        x_t = x_g + sigma[:, None] * torch.randn(32, D)
        omega = (x_g - obj.teacher(x_t, sigma)).abs().mean(1).clamp(min=1e-5)
        logits = obj.discriminator(None, x_t, sigma).clamp(-10, 10).mean(1)
        want = 0.02 * D * F.softplus(-logits) / omega
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)


def test_logit_clamp_stops_the_generator_gradient_outside_it():
    """The official clamp(-10, 10): logits beyond it give a constant BCE and no gradient."""
    obj = sida(fake_is_teacher=True)
    with torch.no_grad():
        obj.discriminator.heads[0].net[-1].bias.fill_(-50.0)
    out = obj.generator_loss(real_batch(16), 1)
    out.loss.mean().backward()
    den = obj.generator.denoiser
    assert out.logs["gan_generator"] > 0
    assert torch.count_nonzero(den.a.grad) == 0 and torch.count_nonzero(den.b.grad) == 0
    obj = sida(fake_is_teacher=True, gan_logit_clamp=0.0)
    with torch.no_grad():
        obj.discriminator.heads[0].net[-1].bias.fill_(-50.0)
    obj.generator_loss(real_batch(16), 1).loss.mean().backward()
    assert obj.generator.denoiser.b.grad.abs().sum() > 0


def test_switch_on_points_in_images_seen():
    """GAN term from iteration ceil(10 / 4) = 3; first generator update after ceil(9 / 4) = 3 critic-only ones."""
    obj = sida(fake_is_teacher=True, gan_start_images=10, generator_warmup_images=9, images_per_step=4)
    assert obj.gan_start_step == 3 and obj.update_schedule.generator_warmup_steps == 3
    assert [obj.update_schedule.is_generator_step(s) for s in range(5)] == [False, False, False, True, True]
    before = obj.generator_loss(real_batch(16), 2)
    assert torch.count_nonzero(before.loss) == 0 and "gan_generator" not in before.logs  # SiD alone: 0 here
    after = obj.generator_loss(real_batch(16), 3)
    assert torch.count_nonzero(after.loss) == 16 and after.logs["gan_generator"] > 0
    # no warm-up: SiD's order (one critic update first)
    assert sida().update_schedule.generator_warmup_steps == 1 and sida().gan_start_step == 0


def test_bad_settings_name_their_key():
    with pytest.raises(ValueError, match="images_per_step"):
        sida(gan_start_images=200_000)
    with pytest.raises(ValueError, match="generator_warmup_images"):
        sida(generator_warmup_images=-1, images_per_step=4)
    with pytest.raises(ValueError, match="gan_generator_weight"):
        sida(gan_generator_weight=-1.0)
    with pytest.raises(ValueError, match="gan_loss"):
        sida(gan_loss="wgan")


def test_generator_update_goes_through_the_frozen_fake_score_and_heads_train_only_in_the_critic(tmp_path):
    """Through the trainer on the tiny UNet: at step 0 the fake score equals the teacher (SiD's gradient is 0), so
    the generator moves by the GAN term alone, whose gradient passes through the fake score's activations (its
    parameters frozen); the fake score and the heads change only in the critic update."""
    overrides = ["objective=sida", *TINY, f"run_dir={tmp_path}", "logger=none", "optim.lr=1e-3", "optim.warmup_steps=0"]
    trainer = build_trainer(compose_train(overrides))
    fake = trainer.roles["fake_score"]
    assert trainer.objective.feature_network is fake
    seen = []
    features = fake.features

    def spy(x, sigma, cond=None):
        out = features(x, sigma, cond)
        if out:  # (empty while a fused forward fills it: the critic's generated half)
            seen.append((x.requires_grad, out[-1].requires_grad, any(p.requires_grad for p in fake.parameters())))
        return out

    fake.features = spy
    before = {r: [p.detach().clone() for p in trainer.roles[r].parameters()] for r in trainer.objective.roles}
    micro = trainer._micro_batches()
    trainer._set_trainable(trainer.generator_roles)
    obj = trainer.objective
    logs = trainer._update(trainer.generator_roles, "generator", lambda b: obj.generator_loss(b, 0), micro)
    # (the control, test_without_the_gan_term_the_first_generator_update_is_zero: a norm below 1e-3)
    assert logs["sid_score_gap"] == 0.0 and logs["gan_generator"] > 0 and logs["generator_grad_norm"] > 0.1
    assert seen and all(s == (True, True, False) for s in seen)  # graph through the features, parameters frozen
    for role in ("fake_score", "discriminator"):
        assert all(torch.equal(p, q) for p, q in zip(trainer.roles[role].parameters(), before[role])), role
    assert any(not torch.equal(p, q) for p, q in zip(trainer.roles["generator"].parameters(), before["generator"]))
    gen_after = [p.detach().clone() for p in trainer.roles["generator"].parameters()]
    trainer._set_trainable(trainer.critic_roles)
    logs = trainer._update(trainer.critic_roles, "critic", lambda b: trainer.objective.critic_loss(b, 0), micro)
    assert logs["fake_score_grad_norm"] > 0 and logs["discriminator_grad_norm"] > 0
    for role in ("fake_score", "discriminator"):
        assert any(not torch.equal(p, q) for p, q in zip(trainer.roles[role].parameters(), before[role])), role
    assert all(torch.equal(p, q) for p, q in zip(trainer.roles["generator"].parameters(), gen_after))


def test_without_the_gan_term_the_first_generator_update_is_zero(tmp_path):
    """The control of the test above: gan_generator_weight = 0 leaves SiD's first gradient, 0 at fake = teacher."""
    overrides = ["objective=sida", *TINY, f"run_dir={tmp_path}", "logger=none", "objective.gan_generator_weight=0"]
    trainer = build_trainer(compose_train(overrides))
    trainer._set_trainable(trainer.generator_roles)
    logs = trainer._update(
        trainer.generator_roles, "generator", lambda b: trainer.objective.generator_loss(b, 0), trainer._micro_batches()
    )
    # (0 up to float round-off: the teacher and its copy backpropagate through the same UNet weights)
    assert logs["generator_grad_norm"] < 1e-3 and "gan_generator" not in logs


def test_pass_count_adds_the_feature_passes(tmp_path):
    """Tiny UNet (features stop after the mid block: 0.25 of a forward): one feature pass in the generator update
    and one of the real half in the critic update (the generated half's taps come with the fake-score loss's
    forward), each with a backward."""
    base = ["objective=sida", *TINY, f"run_dir={tmp_path}"]
    on = build_experiment(compose_train(base)).objective.pass_count()
    off = ["objective.gan_generator_weight=0", "objective.gan_discriminator_weight=0"]
    sid = build_experiment(compose_train([*base, *off])).objective.pass_count()
    assert on.forward_grad - sid.forward_grad == pytest.approx(0.25 + 0.25)
    assert on.backward - sid.backward == pytest.approx(0.25 + 0.25)
    assert on.forward == sid.forward


def test_critic_on_the_unet_reads_the_generated_taps_from_the_fake_score_loss_forward(tmp_path):
    """On the tiny UNet the critic update takes the generated half's taps from the fake-score loss's own forward:
    loss and gradients equal the separate passes (a forward, then features of [generated; real]) on the same draws."""
    from diffdistill.objectives.score_identity import generate

    exp = build_experiment(compose_train(["objective=sida", *TINY, f"run_dir={tmp_path}"]))
    obj, fake, disc = exp.objective, exp.roles["fake_score"], exp.roles["discriminator"]
    assert obj.fuses_critic_passes
    n = 4
    cond = Conditioning(class_labels=torch.arange(n) % 2)
    batch = Batch(torch.randn(n, *exp.roles["generator"].sample_shape), cond)
    params = [p for m in (fake, disc) for p in m.parameters() if p.requires_grad]
    torch.manual_seed(5)
    out = obj.critic_loss(batch, 10**9)
    g_fused = torch.autograd.grad(out.loss.mean(), params)
    torch.manual_seed(5)
    with torch.no_grad():
        x_g, _ = generate(obj.generator, batch, obj.num_steps, grad=False)
    sigma = obj.fake_sigmas(n, x_g.device)
    noise = torch.randn_like(x_g)
    s = sigma[:, None, None, None]
    x_fake_t, x_real_t = x_g + s * noise, batch.x0 + s * noise
    lam = edm_loss_weight(sigma, float(fake.sigma_data))
    dsm = lam * (fake(x_fake_t, sigma, cond) - x_g).pow(2).flatten(1).sum(1)
    l_fake, l_real = disc(fake, x_fake_t, sigma, cond).mean(1), disc(fake, x_real_t, sigma, cond).mean(1)
    ref = dsm + obj.gan_discriminator_weight * 0.5 * lam * (F.softplus(-l_real) + F.softplus(l_fake))
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    g_ref = torch.autograd.grad(ref.mean(), params)
    scale = max(float(g.abs().max()) for g in g_ref)
    for a, b in zip(g_fused, g_ref):  # equal up to the float rounding of a different batching
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * scale)
