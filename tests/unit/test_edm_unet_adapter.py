"""openai-style EDM teachers saved as diffusers UNet2DModel folders (the ImageNet-64 recipes' teacher)."""

import math

import pytest
import torch
from diffusers import UNet2DModel

from diffdistill.models import Teacher
from diffdistill.models.builders import edm_unet_pretrained
from diffdistill.models.conditioning import Conditioning
from tests.helpers import compose_train, tiny_unet2d

CLASSES = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny class-conditional UNet2DModel with one embedding per class and no null class (like openai's)."""
    root = tmp_path_factory.mktemp("edm_unet")
    tiny_unet2d(num_class_embeds=CLASSES).save_pretrained(root)
    return root


@pytest.mark.parametrize("sigma", [0.002, 0.3, 2.0, 80.0])
def test_edm_preconditioning_and_250_log_sigma_timestep(folder, sigma, no_network):
    """D(x, sigma) = c_skip x + c_out F(c_in x, 250 ln sigma, y) (openai/consistency_models karras_diffusion)."""
    den = edm_unet_pretrained(str(folder))
    unet = UNet2DModel.from_pretrained(folder)
    x, y = torch.randn(2, 3, 8, 8) * math.sqrt(sigma**2 + 0.25), torch.tensor([1, 3])
    sd = 0.5
    c_in = 1 / math.sqrt(sigma**2 + sd**2)
    c_skip, c_out = sd**2 * c_in**2, sigma * sd * c_in
    with torch.no_grad():
        F = unet(c_in * x, torch.full((2,), 250 * math.log(sigma)), class_labels=y).sample
        ours = den(x, torch.full((2,), sigma), Conditioning(class_labels=y))
    assert torch.allclose(ours, c_skip * x + c_out * F, atol=1e-5)
    assert den.num_classes == CLASSES and den.sample_shape == (3, 8, 8)


def test_missing_null_class_is_reported(folder, no_network):
    den = edm_unet_pretrained(str(folder))
    with pytest.raises(ValueError, match="null class"):
        den(torch.randn(2, 3, 8, 8), torch.ones(2))  # unconditional call
    teacher = Teacher(den, guidance_scale=2.0)
    with pytest.raises(ValueError, match="null class"):
        teacher(torch.randn(2, 3, 8, 8), torch.ones(2), Conditioning(class_labels=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="class embeddings"):
        edm_unet_pretrained(str(folder), num_classes=CLASSES, null_class=True)
    # with a null class declared, the last embedding is the null class and unconditional calls work
    den_null = edm_unet_pretrained(str(folder), null_class=True)
    assert den_null.num_classes == CLASSES - 1
    assert den_null(torch.randn(2, 3, 8, 8), torch.ones(2)).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("objective", ["cd", "ect", "scm"])
def test_imagenet64_recipes_run_on_a_local_tiny_teacher(folder, objective, tmp_path, no_network):
    """The ImageNet-64 recipes, pointed at a local teacher folder and synthetic data, train and checkpoint."""
    from diffdistill import load_generator
    from diffdistill.cli.train import run

    # LPIPS (the recipe's distance) is covered elsewhere; l2 keeps this at a second
    extra = ["objective.lpips_weights=random", "objective.distance=l2"] if objective == "cd" else []
    cfg = compose_train(
        [
            f"experiment=imagenet64/{objective}",
            f"backbone.denoiser.path={folder}",
            "data=synthetic",
            "data.channels=3",
            "data.resolution=8",
            f"data.num_classes={CLASSES}",
            "trainer=tiny",
            "trainer.device=cpu",
            "trainer.num_grid_samples=4",
            "trainer.max_steps=3",
            "trainer.batch_size=4",
            "trainer.sample_every=3",
            "trainer.checkpoint_every=3",
            "trainer.ema_decays=[0.9]",
            f"run_dir={tmp_path}",
            *extra,
        ]
    )
    assert cfg.optim.name in ("radam", "adam")
    run(cfg)
    gen = load_generator(tmp_path / "checkpoints" / "last")
    with torch.no_grad():
        x = gen(torch.randn(2, 3, 8, 8) * 80, Conditioning(class_labels=torch.tensor([0, 2])))
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
