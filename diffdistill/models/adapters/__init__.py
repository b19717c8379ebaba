"""Adapters: foreign teachers seen as EDM denoisers ``D(x, sigma, cond) -> x0_hat`` (docs/architecture.md §1)."""

from diffdistill.models.adapters.diffusers_vp import DiffusersVPDenoiser
from diffdistill.models.adapters.flow import DiffusersFlowDenoiser, DiffusersFluxDenoiser
from diffdistill.models.adapters.sd import DiffusersSDDenoiser, sd_teacher
from diffdistill.models.adapters.sd3 import sd3_teacher

__all__ = [
    "DiffusersFlowDenoiser",
    "DiffusersFluxDenoiser",
    "DiffusersSDDenoiser",
    "DiffusersVPDenoiser",
    "sd3_teacher",
    "sd_teacher",
]
