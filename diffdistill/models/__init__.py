"""Roles: denoiser, teacher, generator (student), fake score; backbones and analytic teachers."""

from diffdistill.models.analytic import GaussianDenoiser, GaussianMixtureDenoiser
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.denoiser import Denoiser, EDMDenoiser
from diffdistill.models.generator import FakeScore, Generator
from diffdistill.models.teacher import Teacher

__all__ = [
    "Conditioning",
    "Denoiser",
    "EDMDenoiser",
    "FakeScore",
    "GaussianDenoiser",
    "GaussianMixtureDenoiser",
    "Generator",
    "Teacher",
]
