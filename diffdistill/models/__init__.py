"""Roles: denoiser, teacher, generator (student), fake score; backbones and analytic teachers.

Names are resolved lazily (PEP 562), so importing one submodule (``diffdistill.models.conditioning``)
never imports the others: no import cycle runs through this package.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Batch": "conditioning",
    "Conditioning": "conditioning",
    "Denoiser": "denoiser",
    "EDMDenoiser": "denoiser",
    "FakeScore": "generator",
    "GaussianDenoiser": "analytic",
    "GaussianMixtureDenoiser": "analytic",
    "Generator": "generator",
    "Teacher": "teacher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
