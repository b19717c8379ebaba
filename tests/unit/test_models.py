import math

import pytest
import torch

from diffdistill.conventions import append_dims, edm_precond
from diffdistill.models import Conditioning, FakeScore, GaussianDenoiser, GaussianMixtureDenoiser, Generator, Teacher
from diffdistill.models.builders import edm_mlp, edm_unet
from diffdistill.models.io import load_model, save_model
from diffdistill.sampling import heun_sample, multistep_sample, tcd_sample
from diffdistill.schedules import karras_sigmas

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
}


def tiny_unet(num_classes=10):
    torch.manual_seed(0)
    return edm_unet(TINY_UNET, num_classes=num_classes)


def test_gaussian_denoiser_is_tweedie():
    den = GaussianDenoiser(torch.full((4,), 0.3), torch.full((4,), 0.8))
    x = torch.randn(5, 4, requires_grad=True)
    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0])
    # log p_sigma for N(mu, s^2 + sigma^2)
    var = 0.64 + sigma[:, None] ** 2
    logp = (-0.5 * (x - 0.3) ** 2 / var).sum()
    (score,) = torch.autograd.grad(logp, x)
    assert torch.allclose(den(x, sigma), x + sigma[:, None] ** 2 * score, atol=1e-5)


def test_mixture_denoiser_is_tweedie_and_conditional():
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.0], [0.0, -2.0]])
    den = GaussianMixtureDenoiser(means, torch.tensor([0.1, 0.3, 0.2]), weights=torch.tensor([0.5, 0.3, 0.2]))
    x = torch.randn(64, 2, requires_grad=True) * 2
    sigma = torch.rand(64) * 2 + 0.05
    var = den.stds[None] ** 2 + sigma[:, None] ** 2
    logp = (den.weights.log()[None] - ((x[:, None] - means[None]) ** 2).sum(-1) / (2 * var) - var.log()).logsumexp(1)
    (score,) = torch.autograd.grad(logp.sum(), x)
    assert torch.allclose(den(x, sigma), x + sigma[:, None] ** 2 * score, atol=1e-4)
    # a class label selects its component's exact denoiser; the null class gives the mixture
    lab = torch.full((64,), 1)
    comp = means[1] + (0.09 / (0.09 + sigma[:, None] ** 2)) * (x - means[1])
    assert torch.allclose(den(x, sigma, Conditioning(class_labels=lab)), comp, atol=1e-5)
    assert torch.allclose(den(x, sigma, Conditioning(class_labels=torch.full((64,), 3))), den(x, sigma), atol=1e-6)


def test_edm_denoiser_matches_preconditioning_formula():
    den = tiny_unet()
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    cond = Conditioning(class_labels=torch.tensor([0, 3, 10]))
    c_skip, c_out, c_in, c_noise = edm_precond(sigma, 0.5)
    F = den.net(append_dims(c_in, 4) * x, c_noise, cond)
    expect = append_dims(c_skip, 4) * x + append_dims(c_out, 4) * F
    assert torch.allclose(den(x, sigma, cond), expect, atol=1e-6)
    assert den.sample_shape == (1, 8, 8)
    assert len(den.features(x, sigma, cond)) == 3  # two down blocks + mid block


def test_teacher_frozen_differentiable_and_batched_cfg():
    teacher = Teacher(tiny_unet(), guidance_scale=2.5)
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    sigma = torch.full((4,), 2.0)
    cond = Conditioning(class_labels=torch.tensor([1, 2, 3, 4]))
    out = teacher(x, sigma, cond)
    c = teacher.denoiser(x, sigma, cond)
    u = teacher.denoiser(x, sigma, Conditioning(class_labels=torch.full((4,), 10)))
    assert torch.allclose(out, u + 2.5 * (c - u), atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.allclose(teacher(x, sigma, cond, guidance_scale=1.0), c, atol=1e-6)


def test_generator_one_step_and_multistep():
    teacher = Teacher(tiny_unet())
    gen = Generator.from_teacher(teacher, sigma_init=80.0, sampling_sigmas=[80.0, 1.0])
    assert all(p.requires_grad for p in gen.parameters())
    assert gen.denoiser is not teacher.denoiser
    z = torch.randn(2, 1, 8, 8)
    cond = Conditioning(class_labels=torch.tensor([0, 1]))
    assert torch.allclose(gen(z, cond), teacher(80.0 * z, 80.0, cond), atol=1e-6)
    eps = torch.randn(2, 1, 8, 8)
    x0 = teacher(80.0 * z, 80.0, cond)
    expect = teacher(x0 + 1.0 * eps, 1.0, cond)
    assert torch.allclose(multistep_sample(gen.denoise, z, [80.0, 1.0], cond, noise=[eps]), expect, atol=1e-5)
    # TCD with gamma = 1 is multistep consistency sampling; gamma = 0 is deterministic
    g1 = tcd_sample(gen.denoise, z, [80.0, 1.0], 1.0, cond, torch.Generator().manual_seed(3))
    g2 = gen.sample(z, cond, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(g1, g2, atol=1e-5)
    d1 = tcd_sample(gen.denoise, z, [80.0, 1.0], 0.0, cond, torch.Generator().manual_seed(1))
    d2 = tcd_sample(gen.denoise, z, [80.0, 1.0], 0.0, cond, torch.Generator().manual_seed(2))
    assert torch.equal(d1, d2)
    fake = FakeScore.from_teacher(teacher)
    assert torch.allclose(fake(x0, 1.0, cond), teacher(x0, 1.0, cond), atol=1e-6)


def test_heun_sampler_with_exact_denoiser_reaches_data_distribution():
    den = GaussianDenoiser(torch.full((16,), 0.3), torch.full((16,), 0.8))
    z = torch.randn(20000, 16, generator=torch.Generator().manual_seed(0))
    sig = karras_sigmas(40, append_zero=True)
    x = heun_sample(den, z * sig[0], sig)
    assert x.mean().item() == pytest.approx(0.3, abs=0.01)
    assert x.std().item() == pytest.approx(math.sqrt(0.64 + 0.002**2), abs=0.01)


def test_mlp_backbone_runs_with_classes():
    den = edm_mlp(dim=2, hidden=16, depth=2, num_classes=4)
    out = den(torch.randn(5, 2), torch.rand(5) + 0.1, Conditioning(class_labels=torch.tensor([0, 1, 2, 3, 4])))
    assert out.shape == (5, 2) and torch.isfinite(out).all()


def test_model_folder_round_trip_and_errors(tmp_path):
    den = tiny_unet()
    cfg = {"_target_": "diffdistill.models.builders.edm_unet", "unet_config": TINY_UNET, "num_classes": 10}
    save_model(den, cfg, tmp_path / "m")
    back = load_model(tmp_path / "m")
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 5.0])
    assert torch.equal(back(x, s), den(x, s))
    t = Teacher.from_pretrained(tmp_path / "m", guidance_scale=1.5)
    assert t.guidance_scale == 1.5
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_model(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="packaged teachers"):
        Teacher.from_pretrained(tmp_path / "nope")


def test_a_mistyped_local_path_is_never_taken_for_a_hub_id(tmp_path, monkeypatch):
    from diffdistill.models.io import local_or_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for missing in ("runs/teachr", "./teacher", "/no/such/folder", "~/nope", "a/b/c", "runs/x/model"):
        with pytest.raises(FileNotFoundError, match="no hub download was tried"):
            local_or_hub(missing)
    assert local_or_hub("google/ddpm-cifar10-32") == "google/ddpm-cifar10-32"  # a hub id stays one
    assert local_or_hub("runs") == "runs"  # an existing folder is used as it is


def test_multistep_renoises_a_boundary_student_by_algorithm_1():
    """Song et al. 2023, Alg. 1: x0 + sqrt(sigma^2 - sigma_min^2) eps for a boundary-condition student; x0 + sigma eps
    for a student without a boundary."""
    from diffdistill.models.backbones import MLPBackbone
    from diffdistill.models.consistency import ConsistencyDenoiser
    from diffdistill.models.denoiser import EDMDenoiser

    seen = []

    class Recorder(torch.nn.Module):
        sigma_data, sigma_min, sigma_max, num_classes = 0.5, 0.002, 80.0, None
        sample_shape = (3,)

        def forward(self, x, sigma, cond=None):
            seen.append(x.clone())
            return torch.zeros_like(x)

    z, eps = torch.zeros(1, 3), torch.ones(1, 3)
    multistep_sample(Recorder(), z, [80.0, 0.3], noise=[eps], sigma_min=0.2)
    assert torch.allclose(seen[-1], torch.full((1, 3), (0.3**2 - 0.2**2) ** 0.5))
    boundary = Generator(ConsistencyDenoiser(EDMDenoiser(MLPBackbone(dim=3)), sigma_min=0.2), 80.0)
    plain = Generator(EDMDenoiser(MLPBackbone(dim=3)), 80.0)
    assert boundary.renoise_floor == 0.2 and plain.renoise_floor == 0.0
