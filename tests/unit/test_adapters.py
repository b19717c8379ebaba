"""The VP adapter reproduces a diffusers DDPM UNet's x0 prediction in the EDM view."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffdistill.models import Teacher
from diffdistill.models.adapters import DiffusersVPDenoiser
from tests.helpers import tiny_unet2d


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpm")
    tiny_unet2d().save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return root


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_vp_adapter_matches_ddpm_x0(folder, t, no_network):
    den = DiffusersVPDenoiser.from_pretrained(folder)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    abar = sched.alphas_cumprod[t]
    x_vp = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        eps = den.unet(x_vp, torch.tensor([t, t])).sample
        x0_ddpm = (x_vp - (1 - abar).sqrt() * eps) / abar.sqrt()
        sigma = ((1 - abar) / abar).sqrt().repeat(2)
        x0 = den(x_vp / abar.sqrt(), sigma)  # the EDM view of the same point
    assert torch.allclose(x0, x0_ddpm, atol=1e-3, rtol=1e-3)


def test_teacher_from_diffusers_folder_and_errors(folder, tmp_path, no_network):
    t = Teacher(DiffusersVPDenoiser.from_pretrained(folder, quantize=True))
    assert t.sample_shape == (3, 8, 8) and t.sigma_max > 100
    assert torch.equal(t.denoiser.schedule.sigma_to_t(torch.tensor([t.sigma_max])), torch.tensor([999.0]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiffusersVPDenoiser.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersVPDenoiser(t.denoiser.unet, t.denoiser.schedule.alphas_cumprod, "flow")
