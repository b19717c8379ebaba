"""The discriminator role and the GAN losses (docs/invariants.md §5, §9: zero logits, R1 closed form, taps)."""

import math

import pytest
import torch

from diffdistill.models.builders import edm_mlp, edm_unet
from diffdistill.models.discriminator import Discriminator
from diffdistill.models.generator import FakeScore
from diffdistill.models.io import load_model, model_config, save_model
from diffdistill.objectives import gan
from tests.helpers import tiny_unet2d_config


def unet_fake_score():
    torch.manual_seed(0)
    cfg = tiny_unet2d_config(in_channels=1, out_channels=1)
    return FakeScore(edm_unet(cfg, num_classes=10))


def test_gan_losses_at_zero_logits():
    zero = torch.zeros(5, 3)
    assert torch.allclose(gan.discriminator_loss(zero, zero, "ns"), torch.full((5,), 2 * math.log(2)))
    assert torch.allclose(gan.discriminator_loss(zero, zero, "hinge"), torch.full((5,), 2.0))
    assert torch.allclose(gan.generator_loss(zero, "ns"), torch.full((5,), math.log(2)))
    assert torch.equal(gan.generator_loss(zero, "hinge"), torch.zeros(5))


def test_gan_loss_gradients_and_signs():
    """d softplus(-l)/dl = -sigmoid(-l); the discriminator loss falls as real logits rise and fake logits fall."""
    logits = torch.tensor([-2.0, -0.3, 0.0, 1.5], requires_grad=True)
    gan.generator_loss(logits, "ns").sum().backward()
    assert torch.allclose(logits.grad, -torch.sigmoid(-logits.detach()))
    lo, hi = torch.full((1,), -1.0), torch.full((1,), 1.0)
    for kind in gan.GAN_LOSSES:
        assert gan.discriminator_loss(hi, lo, kind) < gan.discriminator_loss(lo, hi, kind)
        assert gan.generator_loss(hi, kind) < gan.generator_loss(lo, kind)
    with pytest.raises(ValueError, match="gan_loss"):
        gan.generator_loss(logits, "wgan")


def test_r1_exact_equals_closed_form_on_a_quadratic_discriminator():
    """D(x) = 1/2 x^T A x + b^T x has grad A x + b (A symmetric): R1 = ||A x + b||^2, per sample."""
    torch.manual_seed(0)
    d = 6
    m = torch.randn(d, d)
    A, b = m + m.T, torch.randn(d)
    x = torch.randn(8, d)

    def disc(v):
        return 0.5 * ((v @ A) * v).sum(1, keepdim=True) + (v @ b)[:, None]

    closed = (x @ A + b).pow(2).sum(1)
    r1 = gan.r1_penalty(disc, x, "exact")
    torch.testing.assert_close(r1, closed, rtol=1e-5, atol=1e-5)
    # the finite-noise form estimates the same quantity: E[(g.n)^2] = ||g||^2, up to O(s) curvature terms
    n = 20000
    xs = x.repeat(n, 1)
    approx = gan.r1_penalty(disc, xs, "approx", noise_std=1e-3).reshape(n, 8).mean(0)
    torch.testing.assert_close(approx, closed, rtol=0.05, atol=0.05)
    # a constant discriminator has no gradient
    const = gan.r1_penalty(lambda v: torch.ones(v.shape[0], 1) + 0 * v.sum(1, keepdim=True), x, "exact")
    assert torch.count_nonzero(const) == 0


def test_r1_exact_trains_the_discriminator():
    """The exact penalty keeps its graph: its gradient reaches the discriminator's parameters."""
    w = torch.randn(4, requires_grad=True)
    r1 = gan.r1_penalty(lambda v: (v * w).sum(1, keepdim=True) ** 2, torch.randn(3, 4), "exact")
    r1.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_heads_on_unet_taps_hold_only_heads_and_rebuild_alone(tmp_path):
    fake = unet_fake_score()
    disc = Discriminator.for_network(fake, taps=[-1, 0], head="conv")
    assert disc.tap_shapes == [[16, 4, 4], [8, 4, 4]]
    fake_keys = set(fake.state_dict())
    assert not fake_keys & set(disc.state_dict())  # the fake score's weights are not duplicated
    assert all(k.startswith("heads.") for k in disc.state_dict())
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    from diffdistill.models.conditioning import Conditioning

    cond = Conditioning(class_labels=torch.tensor([1, 2, 3]))
    logits = disc(fake, x, sigma, cond)
    assert logits.shape == (3, 2)
    save_model(disc, model_config(disc), tmp_path / "disc")
    again = load_model(tmp_path / "disc")
    torch.testing.assert_close(again(fake, x, sigma, cond), logits, rtol=0, atol=0)
    # features computed once can be reused for several logit calls
    feats = disc.features(fake, x, sigma, cond)
    torch.testing.assert_close(disc.logits(feats, x, sigma), logits, rtol=0, atol=0)


def test_mlp_head_on_mlp_backbone_taps_and_the_input_tap():
    torch.manual_seed(0)
    fake = FakeScore(edm_mlp(dim=4, hidden=16, depth=2))
    disc = Discriminator.for_network(fake, taps=[0, 1, "input"], head="mlp", hidden=8)
    assert disc.tap_shapes == [[16], [16], [5]]  # the input tap is c_in x plus a c_noise channel
    assert disc(fake, torch.randn(7, 4), torch.ones(7)).shape == (7, 3)
    # the input tap needs no network (analytic fake scores have no taps)
    alone = Discriminator.for_network(None, taps=["input"], head="mlp", sample_shape=(4,), sigma_data=0.5)
    assert alone(None, torch.randn(2, 4), 1.0).shape == (2, 1)


def test_bad_taps_and_heads_get_one_clear_error():
    fake = FakeScore(edm_mlp(dim=4, hidden=16, depth=2))
    with pytest.raises(ValueError, match="out of range"):
        Discriminator.for_network(fake, taps=[5], head="mlp")
    with pytest.raises(ValueError, match="head: mlp"):
        Discriminator.for_network(fake, taps=[0], head="conv")
    with pytest.raises(ValueError, match="discriminator_heads.head"):
        Discriminator.for_network(fake, taps=[0], head="vit")
    from diffdistill.models.analytic import GaussianDenoiser

    with pytest.raises(ValueError, match="taps: \\[input\\]"):
        Discriminator.for_network(FakeScore(GaussianDenoiser([0.0, 0.0], [1.0, 1.0])), taps=[-1], head="mlp")


def test_gradient_reaches_the_input_through_a_frozen_feature_network():
    """The generator's GAN term: network and heads frozen, the gradient still reaches the (generated) input."""
    fake = unet_fake_score()
    disc = Discriminator.for_network(fake)
    fake.requires_grad_(False)
    disc.requires_grad_(False)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    gan.generator_loss(disc(fake, x, torch.ones(2)), "ns").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*fake.parameters(), *disc.parameters()])


def test_unet_features_stop_after_the_mid_block():
    """The taps are the blocks' outputs of a full forward, and the decoder never runs (DMD2's encoder-only pass)."""
    fake = unet_fake_score()
    unet = fake.denoiser.net.unet
    calls, full = [], []
    unet.up_blocks[0].register_forward_hook(lambda m, i, o: calls.append(1))
    hooks = [
        b.register_forward_hook(lambda m, i, o: full.append(o[0] if isinstance(o, tuple) else o))
        for b in [*unet.down_blocks, unet.mid_block]
    ]
    x, sigma = torch.randn(2, 1, 8, 8), torch.ones(2)
    fake(x, sigma)
    assert len(calls) == 1
    for h in hooks:
        h.remove()
    taps = fake.features(x, sigma)
    assert len(calls) == 1 and len(taps) == len(full) == 3
    for a, b in zip(taps, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_denoise_with_features_is_one_forward_with_the_same_output_and_taps():
    """One forward gives the denoiser's output and exactly the taps ``features`` returns (and the gradients of
    both), on the UNet; the MLP backbone, whose taps come otherwise, falls back to two passes with equal results."""
    from diffdistill.models.backbones import denoise_with_features

    fake = unet_fake_score()
    unet = fake.denoiser.net.unet
    calls = []
    unet.conv_in.register_forward_hook(lambda m, i, o: calls.append(1))
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 1.0, 5.0])
    out, taps = denoise_with_features(fake, x, sigma)
    assert len(calls) == 1  # one pass through the network
    torch.testing.assert_close(out, fake(x, sigma), rtol=0, atol=0)
    ref = fake.features(x, sigma)
    assert len(taps) == len(ref) == 3
    for a, b in zip(taps, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the taps carry the graph of that forward: a loss on output and taps has the two passes' gradient
    params = [p for p in fake.parameters() if p.requires_grad]
    g1 = torch.autograd.grad((out**2).mean() + taps[-1].mean(), params)
    g2 = torch.autograd.grad((fake(x, sigma) ** 2).mean() + fake.features(x, sigma)[-1].mean(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not unet.down_blocks[0]._forward_hooks and not unet.mid_block._forward_hooks  # the hooks are gone
    torch.manual_seed(0)
    mlp = FakeScore(edm_mlp(dim=2, hidden=16, depth=2))
    xm, sm = torch.randn(4, 2), torch.ones(4)
    out_m, taps_m = denoise_with_features(mlp, xm, sm)
    torch.testing.assert_close(out_m, mlp(xm, sm), rtol=0, atol=0)
    for a, b in zip(taps_m, mlp.features(xm, sm)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
