"""Library features the SD-family paper recipes need, each against its paper code's formula: the eps-MSE weighting
(DMD2 SD, SiD-LSG), SiD-LSG's DDPM-uniform noise levels and ``sigma z`` generator input, diffusers' elementwise
pseudo-Huber (LCM scripts), DMD2's SDXL classifier head, and the weights-only init of DMD2's stage 2."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from diffdistill.models import Conditioning, FakeScore, GaussianDenoiser, Generator, Teacher
from diffdistill.models.analytic import AffineDenoiser
from diffdistill.models.discriminator import ConvHead, Discriminator, conv_head_blocks
from diffdistill.objectives.common import denoising_score_matching_loss, dsm_weight, elementwise_pseudo_huber
from diffdistill.objectives.consistency import consistency_distance
from diffdistill.objectives.score_identity import fake_score_loss
from diffdistill.schedules.discrete import DDPMSchedule

D = 8


class Shrink(nn.Module):
    """``x0_hat = x / (1 + sigma^2)`` (the exact denoiser of unit Gaussian data), with a ``sigma_data``."""

    sigma_data = 0.5

    def forward(self, x, sigma, cond=None):
        return x / (1 + sigma[:, None] ** 2)


# ------------------------------------------------------------------------------------------------ R3: eps weighting
def test_eps_weighting_is_the_eps_mse_per_sample():
    """``1/sigma^2 mean ||x0_hat - x0||^2`` is ``mean ||eps_hat - eps||^2``, ``eps_hat = (x - x0_hat) / sigma``."""
    den, x0 = Shrink(), torch.randn(6, D)
    sigma = torch.tensor([0.03, 0.2, 1.0, 2.5, 7.0, 14.6])
    torch.manual_seed(1)
    loss = denoising_score_matching_loss(den, x0, sigma, None, "eps")
    torch.manual_seed(1)
    eps = torch.randn_like(x0)
    x = x0 + sigma[:, None] * eps
    eps_hat = (x - den(x, sigma)) / sigma[:, None]
    torch.testing.assert_close(loss, ((eps_hat - eps) ** 2).mean(1), rtol=1e-5, atol=0)
    # and it is not EDM's weighting (1/sigma^2 + 1/sigma_d^2)
    torch.manual_seed(1)
    edm = denoising_score_matching_loss(den, x0, sigma, None, "edm")
    assert (edm > loss * 1.0001).all()
    assert torch.equal(dsm_weight(sigma, 0.5, "eps"), sigma**-2)
    with pytest.raises(ValueError, match="one of"):
        dsm_weight(sigma, 0.5, "snr")


def test_sid_fake_loss_eps_weighting_is_summed_eps_mse():
    """SiD-LSG's fake loss: ``sum ||eps_hat - eps||^2`` over the sample (``training/sid_training_loop.py``)."""
    fake = FakeScore(GaussianDenoiser(torch.zeros(D), torch.ones(D), trainable=True))
    x_g, noise = torch.randn(4, D), torch.randn(4, D)
    sigma = torch.tensor([0.1, 0.7, 2.0, 9.0])
    loss, _ = fake_score_loss(fake, x_g, Conditioning(), sigma=sigma, noise=noise, weighting="eps")
    x_t = x_g + sigma[:, None] * noise
    eps_hat = (x_t - fake(x_t, sigma)) / sigma[:, None]
    torch.testing.assert_close(loss, ((eps_hat - noise) ** 2).sum(1), rtol=1e-5, atol=0)


def test_fake_weighting_key_of_dmd_and_sid():
    from diffdistill.objectives import DMD, SiD

    teacher = Teacher(GaussianDenoiser(torch.zeros(D), torch.ones(D)))
    gen = Generator(AffineDenoiser(D, 0.5, 0.0), sigma_init=2.5)
    fake = FakeScore.from_teacher(teacher)
    assert DMD(teacher, gen, fake, fake_weighting="eps").fake_weighting == "eps"
    assert SiD(teacher, gen, fake, fake_weighting="eps").fake_weighting == "eps"
    for cls in (DMD, SiD):
        with pytest.raises(ValueError, match="fake_weighting"):
            cls(teacher, gen, fake, fake_weighting="eps_mse")


# ------------------------------------------------------------------------------------------------ R4: DDPM timesteps
def _ddpm_teacher():
    """A Gaussian teacher that carries SD's DDPM schedule (what ``discrete_vp_schedule`` finds on an SD adapter)."""
    den = GaussianDenoiser(torch.zeros(D), torch.ones(D))
    den.schedule = DDPMSchedule.scaled_linear()
    return Teacher(den)


def test_sid_ddpm_sigmas_are_the_scripts_randint_timesteps():
    """``sigma_sampling=ddpm``: both losses at ``sigma_t``, ``t = torch.randint(t_min, t_max)`` (SiD-LSG)."""
    from diffdistill.objectives import SiD

    teacher = _ddpm_teacher()
    gen = Generator(AffineDenoiser(D, 0.5, 0.0), sigma_init=2.5)
    obj = SiD(teacher, gen, FakeScore.from_teacher(teacher), sigma_sampling="ddpm", t_min=20, t_max=980)
    schedule = DDPMSchedule.scaled_linear()
    for draw in (obj.sample_sigmas, obj.fake_sigmas):
        torch.manual_seed(3)
        got = draw(4096, "cpu")
        torch.manual_seed(3)
        want = schedule.sigmas[torch.randint(20, 980, (4096,))].float()
        assert torch.equal(got, want)
    lo, hi = float(schedule.sigmas[20]), float(schedule.sigmas[979])
    assert got.min() >= lo and got.max() <= hi and got.max() == pytest.approx(hi)  # t = 980 is never drawn


def test_sid_lognormal_sigmas_are_the_fake_loss_law_for_both_losses():
    """``sigma_sampling=lognormal`` (an ablation): the generator loss draws ``ln sigma ~ N(P_mean, P_std^2)`` exactly
    as the fake-score loss does (Diff-Instruct's law for both), not the truncated Karras ramp."""
    from diffdistill.objectives import SiD

    teacher = Teacher(GaussianDenoiser(torch.zeros(D), torch.ones(D)))
    gen = Generator(AffineDenoiser(D, 0.5, 0.0), sigma_init=2.5)
    obj = SiD(teacher, gen, FakeScore.from_teacher(teacher), sigma_sampling="lognormal", P_mean=-0.4, P_std=0.6)
    torch.manual_seed(5)
    got = obj.sample_sigmas(20000, "cpu")
    torch.manual_seed(5)
    assert torch.equal(got, obj.fake_sigmas(20000, "cpu"))
    # P_mean carried to the teacher's sigma_data (1 here): + ln(sigma_data / 0.5)
    assert float(got.log().mean()) == pytest.approx(-0.4 + math.log(float(teacher.sigma_data) / 0.5), abs=0.02)
    assert float(got.log().std()) == pytest.approx(0.6, abs=0.02)


def test_sid_ddpm_sampling_needs_a_ddpm_teacher_and_integer_timesteps():
    from diffdistill.objectives import SiD

    edm = Teacher(GaussianDenoiser(torch.zeros(D), torch.ones(D)))
    gen = Generator(AffineDenoiser(D, 0.5, 0.0), sigma_init=2.5)
    with pytest.raises(ValueError, match="no DDPM schedule.*sigma_sampling=karras"):
        SiD(edm, gen, FakeScore.from_teacher(edm), sigma_sampling="ddpm", t_max=980)
    vp = _ddpm_teacher()
    with pytest.raises(ValueError, match="t_min < t_max <= 1000"):
        SiD(vp, gen, FakeScore.from_teacher(vp), sigma_sampling="ddpm", t_min=20, t_max=1001)
    with pytest.raises(ValueError, match="integer"):
        SiD(vp, gen, FakeScore.from_teacher(vp), sigma_sampling="ddpm", t_max=971.2)
    with pytest.raises(ValueError, match="sigma_sampling"):
        SiD(vp, gen, FakeScore.from_teacher(vp), sigma_sampling="uniform")


# ------------------------------------------------------------------------------------------------ R5: input noise
def _sd_student(input_noise: str):
    from diffusers import UNet2DConditionModel

    from diffdistill.models.adapters.sd import DiffusersSDDenoiser
    from diffdistill.testing.tiny_t2i import ddpm_scheduler, tiny_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config("sd", 8))
    den = DiffusersSDDenoiser(unet, ddpm_scheduler().alphas_cumprod)
    return Generator(den, sigma_init=float(den.schedule.sigmas[625]), input_noise=input_noise)


@pytest.mark.parametrize("input_noise", ["prior", "sigma"])
def test_generator_input_noise_matches_the_native_vp_input(input_noise):
    """The UNet sees ``x_vp = z`` (``prior``: what stock pipelines start from) or ``x_vp = add_noise(0, z, t_init) =
    sqrt(1 - abar) z`` (``sigma``: SiD-LSG's ``sid_sd_sampler``), checked against diffusers' ``DDPMScheduler``."""
    from diffdistill.testing.tiny_t2i import ddpm_scheduler

    gen = _sd_student(input_noise)
    seen = {}
    gen.denoiser.unet.register_forward_pre_hook(
        lambda m, args, kw: seen.update(x=args[0] if args else kw["sample"]), with_kwargs=True
    )
    z = torch.randn(2, 4, 8, 8)
    cond = Conditioning(prompt_embeds=torch.randn(2, 3, gen.denoiser.unet.config.cross_attention_dim))
    with torch.no_grad():
        gen(z, cond)
    t = torch.full((2,), 625, dtype=torch.long)
    want = ddpm_scheduler().add_noise(torch.zeros_like(z), z, t) if input_noise == "sigma" else z
    torch.testing.assert_close(seen["x"], want, rtol=1e-5, atol=1e-6)
    scale = gen.prior_std(gen.sigma_init)
    assert scale == pytest.approx(2.501704 if input_noise == "sigma" else math.sqrt(1 + 2.501704**2), abs=1e-5)
    # sample() starts from the same point
    seen.clear()
    with torch.no_grad():
        gen.sample(z, cond, [gen.sigma_init])
    torch.testing.assert_close(seen["x"], want, rtol=1e-5, atol=1e-6)


def test_input_noise_is_recorded_and_old_configs_load():
    from diffdistill.models.io import build_from_config

    gen = _sd_student("sigma")
    config = gen.to_config()
    assert config["input_noise"] == "sigma"
    assert build_from_config(config).input_noise == "sigma"
    old = {k: v for k, v in config.items() if k != "input_noise"}  # a student saved before the key existed
    assert build_from_config(old).input_noise == "prior"
    with pytest.raises(ValueError, match="input_noise"):
        Generator(AffineDenoiser(D, 0.5, 0.0), input_noise="unit")


def test_student_input_noise_config_key():
    from diffdistill.training.builders import check_student

    check_student(OmegaConf.create({"sigma_init": 2.5, "input_noise": "sigma"}))
    with pytest.raises(ValueError, match="student.input_noise must be one of"):
        check_student(OmegaConf.create({"input_noise": "sigma_z"}))


# ------------------------------------------------------------------------------------------------ R6: huber
def test_huber_elementwise_is_diffusers_lcm_loss():
    """``torch.mean(torch.sqrt((pred - target) ** 2 + c ** 2) - c)`` of ``train_lcm_distill_sd_wds.py`` is the batch
    mean of the per-sample distance; c defaults to the script's 0.001."""
    torch.manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    c = 0.001
    script = torch.mean(torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c)
    per_sample = consistency_distance(pred, target, "huber_elementwise")
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample.mean(), script, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        consistency_distance(pred, target, "huber_elementwise", 0.5), elementwise_pseudo_huber(pred - target, 0.5)
    )
    # iCT's pseudo_huber works on the per-sample norm: another loss
    assert not torch.allclose(consistency_distance(pred, target, "pseudo_huber", c), per_sample)


def test_lcm_takes_the_elementwise_huber_distance():
    from diffdistill.objectives.consistency import ConsistencyDistillation

    teacher = Teacher(GaussianDenoiser(torch.zeros(D), torch.ones(D)))
    gen = Generator(AffineDenoiser(D, 0.5, 0.0))
    ConsistencyDistillation.prepare_student(gen, teacher=teacher)
    obj = ConsistencyDistillation(teacher, gen, distance="huber_elementwise", huber_c=0.001)
    assert obj.distance == "huber_elementwise"


# ------------------------------------------------------------------------------------------------ R7: conv head
def test_conv_head_repeats_the_stride_2_block_to_a_4x4_map():
    """DMD2's SDXL head (``main/sd_guidance.py``) on the 32x32 bottleneck: three (conv 4x4/2, GN, SiLU), then conv
    4x4/4, GN, SiLU, conv 1x1; SD1.5 / ImageNet's 8x8 bottleneck: one block."""
    assert conv_head_blocks(32) == [16, 8, 4] and conv_head_blocks(8) == [4] and conv_head_blocks(64)[-1] == 4
    assert conv_head_blocks(32, "once") == [16]
    head = ConvHead(16, 32, downsample="to_4x4")
    convs = [m for m in head.net if isinstance(m, nn.Conv2d)]
    assert [(m.kernel_size, m.stride, m.padding) for m in convs] == [
        ((4, 4), (2, 2), (1, 1)),
        ((4, 4), (2, 2), (1, 1)),
        ((4, 4), (2, 2), (1, 1)),
        ((4, 4), (4, 4), (0, 0)),
        ((1, 1), (1, 1), (0, 0)),
    ]
    kinds = [type(m).__name__ for m in head.net]
    assert kinds == ["Conv2d", "GroupNorm", "SiLU"] * 4 + ["Conv2d"]
    assert head(torch.randn(2, 16, 32, 32)).shape == (2,)
    # on maps of 8x8 and less the head is the one-block head, parameter for parameter and output for output
    for side in (2, 4, 8):
        torch.manual_seed(0)
        new = ConvHead(16, side, downsample="to_4x4")
        torch.manual_seed(0)
        old = ConvHead(16, side, downsample="once")
        assert new.state_dict().keys() == old.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))


def test_discriminator_records_its_downsampling_and_old_configs_load():
    from diffdistill.models.io import build_from_config

    disc = Discriminator([0], [[8, 32, 32]], head="conv")
    assert disc.conv_downsample == "once"  # the behaviour of heads saved before the key existed
    assert len([m for m in disc.heads[0].net if isinstance(m, nn.Conv2d)]) == 3
    new = Discriminator([0], [[8, 32, 32]], head="conv", conv_downsample="to_4x4")
    rebuilt = build_from_config(new.to_config())
    assert rebuilt.conv_downsample == "to_4x4" and rebuilt.state_dict().keys() == new.state_dict().keys()
    config = new.to_config()
    del config["conv_downsample"]
    assert build_from_config(config).state_dict().keys() == disc.state_dict().keys()
    with pytest.raises(ValueError, match="conv_downsample"):
        Discriminator([0], [[8, 32, 32]], conv_downsample="twice")


# ------------------------------------------------------------------------------------------------ R8: init_from
def _toy_run(run_dir, steps, *extra):
    from tests.helpers import compose_train

    return compose_train(
        [
            "experiment=toy/dmd",
            f"run_dir={run_dir}",
            "trainer.device=cpu",
            f"trainer.max_steps={steps}",
            "trainer.batch_size=16",
            "trainer.log_every=1",
            "trainer.sample_every=0",
            f"trainer.checkpoint_every={steps}",
            "objective.critic_steps_per_generator_step=1",
            *extra,
        ]
    )


def test_init_from_starts_with_the_checkpoints_weights_at_step_0(tmp_path):
    """DMD2 stage 2 (``--ckpt_only_path``): another run's role weights, fresh optimisers and schedulers, step 0."""
    from diffdistill.training.builders import build_trainer
    from diffdistill.training.checkpoint import load_checkpoint

    first = build_trainer(_toy_run(tmp_path / "stage1", 4))
    first.fit()
    stage1 = load_checkpoint(tmp_path / "stage1")
    assert stage1["step"] == 4
    fresh = build_trainer(_toy_run(tmp_path / "fresh", 1)).roles["generator"].state_dict()
    trained = stage1["roles"]["generator"]
    assert not all(torch.equal(fresh[k], trained[k]) for k in trained)  # stage 1 moved the generator

    cfg = _toy_run(tmp_path / "stage2", 2, f"trainer.init_from={tmp_path / 'stage1'}", "optim.lr=1.0e-3")
    second = build_trainer(cfg)
    report = second.init_from_checkpoint(cfg.trainer.init_from)
    assert report == {"loaded": ["generator", "fake_score"], "fresh": [], "unused": []}
    for role in ("generator", "fake_score"):
        state = second.roles[role].state_dict()
        assert all(torch.equal(state[k], v) for k, v in stage1["roles"][role].items()), role
    ema = next(iter(second.emas.values()))
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(), trained.values()))
    assert second.step == 0 and ema.num_updates == 0
    assert all(not opt.state for opt in second.optimizers.values())
    assert second.schedulers["generator"].get_last_lr()[0] == pytest.approx(1.0e-3)
    # through fit(): the run starts at step 0 from those weights and writes its own checkpoints
    second.fit()
    assert second.step == 2 and (tmp_path / "stage2" / "checkpoints" / "step0000002").is_dir()
    assert load_checkpoint(tmp_path / "stage2")["optimizers"]["generator"]["state"]  # fresh, then stepped twice


def test_init_from_a_checkpoint_of_other_roles_fails_clearly(tmp_path):
    from diffdistill.training.builders import build_trainer
    from diffdistill.training.checkpoint import save_checkpoint

    trainer = build_trainer(_toy_run(tmp_path / "run", 1))
    save_checkpoint(tmp_path / "bad" / "step0000001", {"generator": (nn.Linear(3, 3), None, None)}, {"step": 1})
    with pytest.raises(ValueError, match="init_from: the 'generator' of checkpoint .* does not match"):
        trainer.init_from_checkpoint(tmp_path / "bad")
    save_checkpoint(tmp_path / "nogen" / "step0000001", {"critic": (nn.Linear(3, 3), None, None)}, {"step": 1})
    with pytest.raises(ValueError, match="no 'generator'"):
        trainer.init_from_checkpoint(tmp_path / "nogen")
    with pytest.raises(FileNotFoundError, match="init_from"):
        trainer.init_from_checkpoint(tmp_path / "missing")
