"""Memory and speed switches of the trainer: activation checkpointing, TF32, channels-last and ``torch.compile``,
each chosen per role (``trainer.gradient_checkpointing: [generator, fake_score]``; ``true`` = every trainable role).
None changes the numbers a role computes except TF32 (10-bit mantissa matmuls on CUDA)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger("diffdistill")


def check_role_switch(key: str, value) -> bool | list[str]:
    """A switch value is ``true``/``false`` or a list of role names (checked against the run's roles later)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{key} must be true, false or a list of role names (e.g. [generator, fake_score]), got {value!r}")


def switch_roles(key: str, value: bool | list[str], trainable: Iterable[str], known: Iterable[str]) -> list[str]:
    """The roles a switch applies to: ``true`` = the trainable ones, a list = those named (each must exist)."""
    if value is True:
        return list(trainable)
    if value is False:
        return []
    known = list(known)
    for r in value:
        if r not in known:
            raise ValueError(f"{key} names role '{r}', which this objective does not build (roles: {', '.join(known)})")
    return list(dict.fromkeys(value))


def enable_activation_checkpointing(module: nn.Module) -> int:
    """Activation checkpointing in every network inside ``module`` that supports it (diffusers models with
    ``_supports_gradient_checkpointing``, diffdistill backbones with ``enable_gradient_checkpointing``): their
    blocks' activations are recomputed in the backward pass instead of stored. Returns how many networks."""
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is a dependency
        ModelMixin = ()  # noqa: N806
    n = 0
    for m in module.modules():
        if isinstance(m, ModelMixin):
            if getattr(m, "_supports_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()
                n += 1
        elif callable(getattr(m, "enable_gradient_checkpointing", None)):
            m.enable_gradient_checkpointing()
            n += 1
    return n


def set_tf32(enabled: bool, device: torch.device) -> str:
    """TF32 for fp32 matmuls and convolutions on CUDA (process-wide); says what it did."""
    if device.type != "cuda":
        return "not applicable: TF32 is a CUDA tensor-core format"
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        precision = "tf32" if enabled else "ieee"
        matmul.fp32_precision = precision
        conv.conv.fp32_precision = precision
    else:
        matmul.allow_tf32 = enabled
        conv.allow_tf32 = enabled
    return "tf32" if enabled else "ieee fp32"


def to_channels_last(module: nn.Module) -> bool:
    """NHWC memory format for the 4-D weights of an image role (convolutions on tensor cores); 1-D roles skip."""
    shape = getattr(module, "sample_shape", None)
    if shape is None or len(shape) != 3:
        return False
    module.to(memory_format=torch.channels_last)
    return True


def compile_role(module: nn.Module) -> bool:
    """``torch.compile`` the role's denoiser in place (``nn.Module.compile``: the module, its parameters and its
    state-dict keys stay, so checkpoints and EMA tracks are those of an eager run)."""
    den = getattr(module, "denoiser", None)
    if not isinstance(den, nn.Module):
        return False
    den.compile()
    return True
