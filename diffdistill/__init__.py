"""diffdistill: one framework for distilling diffusion models into one-step and few-step generators.

The public API (resolved lazily, so ``import diffdistill`` stays cheap):

* :func:`load_generator`: a trained student from its model folder, a checkpoint or a run folder;
* :class:`Teacher`: a frozen denoiser with classifier-free guidance (``Teacher.from_pretrained``);
* :data:`OBJECTIVES`: the registry of distillation objectives, by name;
* :func:`compose_config`: the CLI's Hydra config, composed from Python with the same overrides.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0.dev0"

_EXPORTS = {
    "load_generator": "diffdistill.models.io",
    "Teacher": "diffdistill.models.teacher",
    "Generator": "diffdistill.models.generator",
    "Conditioning": "diffdistill.models.conditioning",
    "OBJECTIVES": "diffdistill.objectives",
    "Objective": "diffdistill.objectives",
    "register_objective": "diffdistill.objectives",
    "compose_config": "diffdistill.cli.common",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffdistill' has no attribute {name!r}")
