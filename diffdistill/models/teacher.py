"""The teacher role: a frozen denoiser with classifier-free guidance applied inside it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffdistill.conventions import as_sigma, cfg_combine
from diffdistill.models.conditioning import Conditioning, as_conditioning
from diffdistill.models.denoiser import Denoiser, WrapsDenoiser


def can_guide(model: nn.Module) -> bool:
    """Whether ``model`` (a teacher, fake score or denoiser) has an unconditional side for CFG: a null class or a
    null prompt."""
    has_class = getattr(model, "num_classes", None) is not None and getattr(model, "has_null_class", True)
    return has_class or getattr(model, "null_prompt", None) is not None


class Teacher(WrapsDenoiser, nn.Module):
    """Frozen denoiser + CFG ``x0_u + w (x0_c - x0_u)`` computed in one batched forward of ``[cond; uncond]``.

    Parameters are frozen; inputs stay differentiable (SiD and SIM backpropagate through the teacher).

    Args:
        denoiser: the pretrained denoiser.
        guidance_scale: CFG scale ``w`` (1 = no guidance, the default).
    """

    def __init__(self, denoiser: Denoiser, guidance_scale: float = 1.0):
        super().__init__()
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.guidance_scale = float(guidance_scale)

    def train(self, mode: bool = True) -> Teacher:  # a teacher is always in eval mode
        return super().train(False)

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        cond: Conditioning | None = None,
        guidance_scale: float | Tensor | None = None,
    ) -> Tensor:
        sigma = as_sigma(sigma, x.shape[0], x.device)
        cond = as_conditioning(cond)
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        uncond = self._uncond(cond, w)
        if uncond is None:
            return self.denoiser(x, sigma, cond.without_negative())
        both = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), Conditioning.cat([cond.without_negative(), uncond])
        )
        x0_c, x0_u = both.chunk(2)
        return cfg_combine(x0_u, x0_c, w)

    def guides(self, cond: Conditioning, w: float | Tensor | None = None) -> bool:
        """Whether a call with ``cond`` at scale ``w`` (default: the teacher's) runs CFG (two batched passes)."""
        w = self.guidance_scale if w is None else w
        return (torch.is_tensor(w) or w != 1.0) and self.denoiser.uncond(cond) is not None

    def _uncond(self, cond: Conditioning, w) -> Conditioning | None:
        if not (torch.is_tensor(w) or w != 1.0):
            return None
        if cond.class_labels is not None and self.num_classes is not None and not self.has_null_class:
            raise ValueError(
                "classifier-free guidance needs a teacher trained with a null class; this one has none "
                "(set guidance_scale=1)"
            )
        return self.denoiser.uncond(cond)

    def features(self, x, sigma, cond=None):
        return self.denoiser.features(x, sigma, cond)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, guidance_scale: float = 1.0, ema: str | float | None = "auto"
    ) -> Teacher:
        """Load a teacher from a model folder (``config.json`` + ``model.safetensors``), a checkpoint or run folder
        of a (teacher-)training run (its EMA generator's denoiser), a diffusers text-to-image pipeline folder (SD,
        SDXL, SD3: ``sd_teacher`` / ``sd3_teacher``), or the name of a packaged teacher (``fashion_mnist``,
        ``fashion_mnist_t2i``). Every case goes through ``diffdistill.models.io`` (no training code is imported)."""
        from diffdistill.models.generator import Generator
        from diffdistill.models.io import generator_folder, is_model_folder, load_model
        from diffdistill.utils.paths import ASSETS

        p = Path(path)
        packaged = ASSETS / "teachers" / str(path)
        if not p.exists() and packaged.exists():
            p = packaged
        if not p.exists():
            avail = (
                sorted(d.name for d in (ASSETS / "teachers").iterdir() if d.is_dir())
                if (ASSETS / "teachers").exists()
                else []
            )
            raise FileNotFoundError(
                f"teacher '{path}' not found: give a model folder, a checkpoint or run folder, or one of "
                f"the packaged teachers {avail}"
            )
        if (p / "model_index.json").is_file():  # a diffusers text-to-image pipeline folder (SD, SDXL, SD3)
            from diffdistill.models.text import pipeline_kind

            if pipeline_kind(p) == "sd3":
                from diffdistill.models.adapters.sd3 import sd3_teacher

                return sd3_teacher(p, guidance_scale)
            from diffdistill.models.adapters.sd import sd_teacher

            return sd_teacher(p, guidance_scale)
        model = load_model(p if is_model_folder(p) else generator_folder(p, ema))
        if isinstance(model, Generator):  # a trained denoiser saved as a generator role
            model = model.denoiser
        return cls(model, guidance_scale)
