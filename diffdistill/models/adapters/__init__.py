"""Adapters: foreign teachers seen as EDM denoisers ``D(x, sigma, cond) -> x0_hat`` (docs/architecture.md §1)."""

from diffdistill.models.adapters.diffusers_vp import DiffusersVPDenoiser
from diffdistill.models.adapters.sd import DiffusersSDDenoiser, sd_teacher

__all__ = ["DiffusersSDDenoiser", "DiffusersVPDenoiser", "sd_teacher"]
