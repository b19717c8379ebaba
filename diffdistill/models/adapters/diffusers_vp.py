"""A diffusers DDPM-family ``UNet2DModel`` (VP, eps / v / sample prediction) as an EDM denoiser.

EDM view of VP (docs/architecture.md §1): ``x_vp = alpha x0 + s eps`` is ``x = x_vp / alpha``,
``sigma = s / alpha``.
The adapter maps ``sigma`` to the (fractional or quantised) DDPM timestep, feeds ``alpha x`` to the UNet and
turns its output into ``x0_hat`` with the conversions of :mod:`diffdistill.conventions`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffdistill.conventions import append_dims, eps_to_x0, v_to_x0
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.denoiser import Denoiser
from diffdistill.schedules.discrete import DDPMSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def vp_schedule(alphas_cumprod: Tensor, prediction_type: str, quantize: bool, allowed: tuple[str, ...]) -> DDPMSchedule:
    """The ``DDPMSchedule`` of a VP network trained with ``alphas_cumprod``, after checking ``prediction_type``."""
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type must be one of {allowed}, got '{prediction_type}'")
    return DDPMSchedule(alphas_cumprod, quantize=quantize)


def vp_inputs(schedule: DDPMSchedule, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The network's inputs at EDM ``(x, sigma)``: ``x_vp = alpha x``, the DDPM timestep ``t``, and ``alpha``, ``s``."""
    alpha, s = schedule.alpha_sigma(sigma)
    x_vp = x * append_dims(alpha, x.ndim)  # EDM -> VP: x_vp = alpha x
    return x_vp, schedule.sigma_to_t(sigma), alpha, s


def vp_to_x0(prediction_type: str, out: Tensor, x: Tensor, x_vp: Tensor, sigma: Tensor, alpha, s) -> Tensor:
    """``x0_hat`` from the network output ``out`` of a ``prediction_type`` network fed :func:`vp_inputs`."""
    if prediction_type == "epsilon":
        return eps_to_x0(x, out, sigma)  # x0 = x - sigma eps (the EDM view of x0 = (x_vp - s eps) / alpha)
    if prediction_type == "v_prediction":
        return v_to_x0(x_vp, out, alpha, s)  # x0 = alpha x_vp - s v (Salimans & Ho 2022)
    return out


class DiffusersVPDenoiser(Denoiser):
    """Wrap a VP ``UNet2DModel``.

    Args:
        unet: the diffusers ``UNet2DModel``.
        alphas_cumprod: the training schedule's ``abar_t`` (from its ``DDPMScheduler``).
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample`` (the scheduler config's field).
        quantize: round timesteps to integers (the network only saw integer timesteps).
        sigma_data: data std in the EDM view (0.5 for pixels in ``[-1, 1]``).
        num_classes: real classes of a class-conditional UNet (``num_class_embeds = num_classes + 1``).
    """

    def __init__(
        self,
        unet: nn.Module,
        alphas_cumprod: Tensor,
        prediction_type: str = "epsilon",
        quantize: bool = False,
        sigma_data: float = 0.5,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.unet, self.prediction_type = unet, prediction_type
        self.schedule = vp_schedule(alphas_cumprod, prediction_type, quantize, PREDICTION_TYPES)
        self.sigma_data, self.num_classes = float(sigma_data), num_classes
        self.sigma_min, self.sigma_max = self.schedule.sigma_min, self.schedule.sigma_max

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        unet_subfolder: str | None = "unet",
        scheduler_subfolder: str | None = "scheduler",
        quantize: bool = False,
        num_classes: int | None = None,
        **kw,
    ) -> DiffusersVPDenoiser:
        """Load ``UNet2DModel`` + ``DDPMScheduler`` from a diffusers folder or hub id (``google/ddpm-cifar10-32``).

        Nothing is downloaded unless ``path`` is a hub id and the hub is reachable (``HF_HUB_OFFLINE`` unset).
        """
        from diffusers import DDPMScheduler, UNet2DModel

        from diffdistill.models.io import local_or_hub

        path = local_or_hub(path)
        try:
            unet = UNet2DModel.from_pretrained(str(path), subfolder=unet_subfolder, **kw)
            sched = DDPMScheduler.from_pretrained(str(path), subfolder=scheduler_subfolder)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"could not load a diffusers UNet2DModel + DDPMScheduler from '{path}': {e}") from e
        return cls(unet, sched.alphas_cumprod, sched.config.prediction_type, quantize, num_classes=num_classes)

    @classmethod
    def from_config(
        cls,
        unet_config: dict,
        alphas_cumprod: list[float],
        prediction_type: str = "epsilon",
        quantize: bool = False,
        sigma_data: float = 0.5,
        num_classes: int | None = None,
    ) -> DiffusersVPDenoiser:
        """The architecture alone (random weights), as a saved model folder records it."""
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_config(unet_config)
        return cls(
            unet, torch.tensor(alphas_cumprod, dtype=torch.float64), prediction_type, quantize, sigma_data, num_classes
        )

    def to_config(self) -> dict:
        return {
            "_target_": "diffdistill.models.adapters.diffusers_vp.DiffusersVPDenoiser.from_config",
            "unet_config": {k: v for k, v in self.unet.config.items() if not k.startswith("_")},
            "alphas_cumprod": self.schedule.alphas_cumprod.double().cpu().tolist(),
            "prediction_type": self.prediction_type,
            "quantize": self.schedule.quantize,
            "sigma_data": self.sigma_data,
            "num_classes": self.num_classes,
        }

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        s = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (c.in_channels, s, s)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        x_vp, t, alpha, s = vp_inputs(self.schedule, x, sigma)
        labels = cond.class_labels
        if self.num_classes is not None and labels is None:
            labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        out = self.unet(x_vp, t, class_labels=labels).sample.to(x.dtype)
        return vp_to_x0(self.prediction_type, out, x, x_vp, sigma, alpha, s)
