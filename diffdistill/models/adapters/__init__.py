"""Adapters: foreign teachers seen as EDM denoisers ``D(x, sigma, cond) -> x0_hat`` (docs/architecture.md §1)."""

from diffdistill.models.adapters.diffusers_vp import DiffusersVPDenoiser

__all__ = ["DiffusersVPDenoiser"]
