"""LoRA students (peft): the generator is the teacher's network plus low-rank adapters.

With ``share_base`` the student *is* the teacher's network with its adapters switched on, and the teacher is a
view of the same modules with the adapters switched off (:class:`SharedBaseDenoiser`): one copy of the base
weights serves both roles, as in LCM-LoRA (Luo et al. 2023, arXiv:2311.05556) and SimpleTuner's LoRA
distillation. Without ``share_base`` the student is a frozen copy of the teacher plus adapters.

LoRA's ``B`` matrices start at zero, so a freshly adapted student computes exactly the teacher's function.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from diffdistill.models.denoiser import Denoiser

DEFAULT_ADAPTER = "student"


def default_target_modules(module: nn.Module) -> list[str]:
    """Every ``nn.Linear`` and ``nn.Conv2d`` inside ``module`` except class/guidance embedding tables (full names)."""
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and "guidance_emb" not in name
        and not name.endswith("time_embedding.cond_proj")  # the SD adapter's guidance embedding (LCM)
        and name
    ]


def add_lora(
    module: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    dropout: float = 0.0,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Inject LoRA adapters into ``module`` in place; afterwards only adapter weights (and modules added later,
    such as LCM's guidance embedding) require gradients. Returns ``module``."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = list(target_modules) if target_modules else default_target_modules(module)
    if not targets:
        raise ValueError(f"{type(module).__name__} has no Linear/Conv2d layers to adapt")
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha or rank), target_modules=targets, lora_dropout=dropout)
    inject_adapter_in_model(cfg, module, adapter_name=adapter_name)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    # recorded so that a saved model rebuilds the same adapters (diffdistill.models.io.model_config)
    module.lora_spec = {
        "rank": int(rank),
        "alpha": float(alpha or rank),
        "target_modules": targets,
        "dropout": float(dropout),
        "adapter_name": adapter_name,
    }
    return module


def with_lora(
    module: nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    dropout: float = 0.0,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """``module`` with LoRA adapters: what a saved LoRA student's ``config.json`` builds (weights load after)."""
    return add_lora(module, rank, alpha, target_modules, dropout, adapter_name)


def tuner_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Every peft-adapted layer inside ``module``, by its name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in module.named_modules() if name and isinstance(m, BaseTunerLayer)}


def _tuner_layers(module: nn.Module) -> Iterator[nn.Module]:
    return iter(tuner_layers(module).values())


def has_lora(module: nn.Module) -> bool:
    return next(_tuner_layers(module), None) is not None


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its base network, then restore it: every LoRA adapter off, and any student-only
    guidance embedding (LCM's, added after the teacher was trained) detached."""
    layers = list(_tuner_layers(module))
    before = [not layer.disable_adapters for layer in layers]
    hosts = [m for m in module.modules() if getattr(m, "guidance_emb", None) is not None]
    embs = [m.guidance_emb for m in hosts]
    for layer in layers:
        layer.enable_adapters(False)
    for m in hosts:
        m.guidance_emb = None
    try:
        yield
    finally:
        for layer, on in zip(layers, before):
            layer.enable_adapters(on)
        for m, e in zip(hosts, embs):
            m.guidance_emb = e


def strip_lora(module: nn.Module) -> nn.Module:
    """Replace every adapted layer of ``module`` by its base layer, in place (drops the adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in list(module.named_modules()):
        if name and isinstance(m, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, m.get_base_layer())
    module.__dict__.pop("lora_spec", None)
    return module


def lora_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Only the adapter weights (what an LCM-LoRA style release ships)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if "lora_" in k}


class SharedBaseDenoiser(Denoiser):
    """The teacher's view of a LoRA student's network: the same modules, adapters off, eval mode.

    The shared network is kept outside ``_modules`` so that the teacher neither owns, freezes, moves nor
    checkpoints the student's weights; the trainer handles them through the generator role.
    """

    def __init__(self, shared: nn.Module):
        super().__init__()
        self._shared = [shared]  # a list: not registered as a submodule
        for attr in ("sigma_data", "sigma_min", "sigma_max"):
            setattr(self, attr, getattr(shared, attr))

    @property
    def shared(self) -> nn.Module:
        return self._shared[0]

    @property
    def num_classes(self) -> int | None:
        return getattr(self.shared, "num_classes", None)

    @property
    def has_null_class(self) -> bool:
        return getattr(self.shared, "has_null_class", True)

    @property
    def null_prompt(self):
        return getattr(self.shared, "null_prompt", None)

    def prior_std(self, sigma: float) -> float:
        return self.shared.prior_std(sigma)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.shared.sample_shape)

    @property
    def net(self) -> nn.Module | None:  # the raw backbone (null-class checks, TrigFlow fast path)
        return getattr(self.shared, "net", None)

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None, **kwargs) -> Tensor:
        was_training = self.shared.training
        self.shared.train(False)
        try:
            with adapters_disabled(self.shared):
                return self.shared(x, sigma, cond, **kwargs)
        finally:
            self.shared.train(was_training)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        return self.forward(x, sigma, cond)

    def features(self, x: Tensor, sigma: Tensor, cond: Any = None):
        with adapters_disabled(self.shared):
            return self.shared.features(x, sigma, cond)

    def trainable_copy(self) -> nn.Module:
        """A full trainable copy of the *base* network (no adapters): how other roles (DMD's fake score) start."""
        return strip_lora(copy.deepcopy(self.shared)).requires_grad_(True).train()
