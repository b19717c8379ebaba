"""Shared test helpers: Hydra composition of the train config."""

from __future__ import annotations

from diffdistill.cli.common import compose_config


def compose_train(overrides: list[str], config_name: str = "train"):
    return compose_config(overrides, config_name)


TINY = ["~experiment", "backbone=tiny_unet", "data=synthetic", "trainer=tiny", "trainer.device=cpu"]


def tiny_unet2d_config(**kwargs) -> dict:
    """Keyword arguments of a tiny diffusers ``UNet2DModel`` (8x8x3, two levels), with ``kwargs`` overriding."""
    config = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return {**config, **kwargs}


def tiny_unet2d(**kwargs):
    """A tiny random-weight diffusers ``UNet2DModel``, seeded, for adapter tests that save it locally."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(**tiny_unet2d_config(**kwargs))


def state_equal(a, b) -> bool:
    """Nested checkpoint states are equal: tensors bit for bit, plain values by value."""
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b if isinstance(a, (int, float, str, bool)) else True


def perturb(module, seed: int, only: str = ""):
    """Add seeded ``0.05 N(0, 1)`` noise to every parameter whose name contains ``only`` (default: all, so the
    zero-initialised LoRA B, guidance projections and output layers matter too; ``only="lora_"``: the adapters
    only) and return the module in eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()
