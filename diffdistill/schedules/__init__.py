"""Noise schedules: discretisations and training densities over EDM sigma (pure functions)."""

from diffdistill.schedules.discrete import DDPMSchedule
from diffdistill.schedules.flow import flow_shift, sigma_to_u, u_to_sigma
from diffdistill.schedules.karras import (
    KarrasSchedule,
    LogNormalSigma,
    LogUniformSigma,
    SigmaSampler,
    karras_sigmas,
)

__all__ = [
    "DDPMSchedule",
    "KarrasSchedule",
    "LogNormalSigma",
    "LogUniformSigma",
    "SigmaSampler",
    "flow_shift",
    "karras_sigmas",
    "sigma_to_u",
    "u_to_sigma",
]
