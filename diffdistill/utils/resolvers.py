"""OmegaConf resolvers the shipped configs use (registered when :mod:`diffdistill.cli.common` is imported).

``${dd.sigma_data:${data}}``: the ``sigma_data`` of the data config's dataset, so a network built for a toy
dataset gets EDM's preconditioning for that data without the user computing it (Karras et al. 2022, App. B.6).
Datasets whose class defines ``sigma_data`` (the toys of :mod:`diffdistill.data.toy`, cheap to build) are built
to read it; other data (images scaled to ``[-1, 1]``) give the papers' 0.5 without being loaded.

``${dd.num_classes:${data}}``: the number of classes of such a dataset (``None`` when unconditional).

``${dd.data_sigma:2.5,${data}}``: a paper's noise level, stated for ``sigma_data = 0.5``, carried to the dataset's
``sigma_data`` (``2.5 sigma_data / 0.5``): what rescaling the data to 0.5 would give (SiD's ``sigma_init`` on a toy).

``${dd.steps_fraction:${trainer.max_steps},0.1}``: a fraction of the run in whole steps (at least 1), so a recipe's
warm-up or stage length that the paper states as a share of training follows ``trainer.max_steps``.

``${dd.sd_sigmas:999,499}``: the EDM sigmas of DDPM timesteps under Stable Diffusion's training schedule
(``scaled_linear``, betas 0.00085..0.012, 1000 steps: SD 1.x / 2.x, SDXL), exactly, so that papers' timestep lists
(DMD2's 999/749/499/249) become ``student.sampling_sigmas`` that export to ``LCMScheduler`` timesteps unchanged.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from diffdistill.conventions import PAPER_SIGMA_DATA


def data_sigma_data(node: DictConfig) -> float:
    """``sigma_data`` of the dataset that ``node`` (a data config with ``_target_``) builds."""
    ds = _toy_dataset(node, "sigma_data")
    return PAPER_SIGMA_DATA if ds is None else round(float(ds.sigma_data), 6)


def _toy_dataset(node: DictConfig, what: str):
    """The dataset of ``node`` when its class defines ``sigma_data`` (cheap toys), else ``None``."""
    from hydra._internal.utils import _locate
    from hydra.utils import instantiate

    target = node.get("_target_") if OmegaConf.is_dict(node) else None
    if target is None:
        raise ValueError(f"dd.{what} needs a data config with a _target_, got {node!r}")
    cls = _locate(str(target))
    return instantiate(node) if isinstance(getattr(cls, "sigma_data", None), property) else None


def data_sigma(sigma: float, node: DictConfig) -> float:
    """``sigma`` (a paper's, for ``sigma_data = 0.5``) times ``sigma_data / 0.5`` of the dataset ``node`` builds."""
    return round(float(sigma) * data_sigma_data(node) / PAPER_SIGMA_DATA, 6)


def data_num_classes(node: DictConfig) -> int | None:
    """Classes of the toy dataset ``node`` builds (``None``: unconditional); other data: ``node.num_classes``."""
    ds = _toy_dataset(node, "num_classes")
    return getattr(ds, "num_classes", None) if ds is not None else node.get("num_classes")


def steps_fraction(max_steps: int, fraction: float) -> int:
    """``round(fraction * max_steps)`` steps, at least 1 (``fraction`` in ``(0, 1]``)."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"dd.steps_fraction needs a positive integer step count, got {max_steps!r}")
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"dd.steps_fraction takes a fraction in (0, 1], got {fraction!r}")
    return max(1, round(float(fraction) * max_steps))


def sd_sigmas(*timesteps: int) -> list[float] | float:
    """EDM sigmas ``sqrt((1 - abar_t) / abar_t)`` of integer timesteps of SD's ``scaled_linear`` schedule: a list,
    or one float for one timestep (``student.sigma_init: ${dd.sd_sigmas:625}``)."""
    from diffdistill.schedules.discrete import DDPMSchedule

    sched = DDPMSchedule.scaled_linear()
    out = []
    for t in timesteps:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < len(sched.sigmas):
            raise ValueError(f"dd.sd_sigmas takes integer timesteps in [0, {len(sched.sigmas) - 1}], got {t!r}")
        out.append(float(sched.sigmas[t]))
    return out[0] if len(out) == 1 else out


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dd.sigma_data"):
        OmegaConf.register_new_resolver("dd.sigma_data", data_sigma_data, use_cache=False)
    if not OmegaConf.has_resolver("dd.data_sigma"):
        OmegaConf.register_new_resolver("dd.data_sigma", data_sigma, use_cache=False)
    if not OmegaConf.has_resolver("dd.num_classes"):
        OmegaConf.register_new_resolver("dd.num_classes", data_num_classes, use_cache=False)
    if not OmegaConf.has_resolver("dd.steps_fraction"):
        OmegaConf.register_new_resolver("dd.steps_fraction", steps_fraction)
    if not OmegaConf.has_resolver("dd.sd_sigmas"):
        OmegaConf.register_new_resolver("dd.sd_sigmas", sd_sigmas)
