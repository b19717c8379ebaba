"""diffdistill's own diffusers pipeline, for students the stock pipelines cannot express.

:class:`DiffDistillGeneratorModel` is a diffusers ``ModelMixin``/``ConfigMixin`` holding a diffdistill
:class:`~diffdistill.models.generator.Generator`; its ``config.json`` records the denoiser's ``_target_`` config
(``diffdistill.models.io.model_config``) and the sampling recipe (sigma list, TCD gamma, guidance range), so
``from_pretrained`` rebuilds it without a dataset, teacher or objective. :class:`DiffDistillPipeline` samples it
with diffdistill's own samplers (``diffdistill/sampling.py``): consistency multistep sampling (Song et al. 2023,
arXiv:2303.01469, Alg. 1) or, with a gamma, TCD's gamma sampling (Zheng et al. 2024, arXiv:2402.19159).

Seeding convention: from ``generator`` the pipeline draws, in order, the unit latents ``z`` ``[B, *sample_shape]``
(unless ``latents`` is given), the random class labels (only when none are given; never the null class), then one
fresh noise tensor per further step. ``z = torch.randn((B, *shape), generator=g)`` followed by
``student.sample(z, cond, generator=g)`` reproduces a call with labels.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from diffdistill.models.conditioning import Conditioning
from diffdistill.models.generator import Generator
from diffdistill.sampling import multistep_sample

TorchGenerator = torch.Generator | list[torch.Generator] | None


def backbone_of(denoiser: nn.Module) -> nn.Module:
    """The raw network under the preconditioning wrappers (``ConsistencyDenoiser.inner``, ``EDMDenoiser.net``)."""
    m = denoiser
    while True:
        inner = getattr(m, "inner", None)
        inner = getattr(m, "net", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return m
        m = inner


class DiffDistillGeneratorModel(ModelMixin, ConfigMixin):
    """A distilled student as a diffusers model: ``self.generator`` is the diffdistill ``Generator``.

    Args:
        denoiser_config: the ``_target_`` config that rebuilds the student's denoiser (without LoRA adapters).
        sigma_init: the one-step input noise level.
        sampling_sigmas: the recipe's few-step sigma list (``[sigma_init]`` = one step).
        gamma: TCD gamma of the recipe (``None``: consistency multistep sampling).
        guidance: ``{w_min, w_max, w_default}`` of a guidance-embedded student (``None`` otherwise).
        num_classes: real classes of a class-conditional student (the null class is ``num_classes``).
        null_class: whether the network has the null-class embedding (unconditional calls).
        sample_shape: the shape of one sample.
        input_noise: the student's input noise scale, ``prior`` or ``sigma`` (see ``Generator``).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        denoiser_config: dict[str, Any],
        sigma_init: float = 80.0,
        sampling_sigmas: list[float] | None = None,
        gamma: float | None = None,
        guidance: dict[str, float] | None = None,
        num_classes: int | None = None,
        null_class: bool = True,
        sample_shape: list[int] | None = None,
        input_noise: str = "prior",
    ) -> None:
        super().__init__()
        from diffdistill.models.io import build_from_config

        den = build_from_config(dict(denoiser_config))
        self.generator = Generator(den, sigma_init, sampling_sigmas, guidance, input_noise=input_noise)

    @property
    def unet(self) -> nn.Module | None:
        """The diffusers ``UNet2DModel`` inside the student, if its backbone is one."""
        return getattr(backbone_of(self.generator.denoiser), "unet", None)

    @property
    def lora_root(self) -> nn.Module:
        """The module LoRA adapters of an export are relative to: the UNet, else the denoiser."""
        return self.unet if self.unet is not None else self.generator.denoiser

    def load_lora(self, model_id: str, subfolder: str | None = None, fuse: bool = True) -> None:
        """Apply a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors`` in a folder, or a hub
        repository and ``subfolder``) in place; ``fuse`` merges it into the weights (``merge_and_unload``)."""
        from peft import PeftModel

        # peft injects the adapter layers into ``lora_root`` in place; merging replaces them by fused layers
        peft_model = PeftModel.from_pretrained(self.lora_root, model_id, subfolder=subfolder)
        if fuse:
            peft_model.merge_and_unload()

    def forward(self, z: Tensor, cond: Conditioning | None = None) -> Tensor:
        """One-step generation from unit noise ``z``."""
        return self.generator(z, cond)


class DiffDistillPipeline(DiffusionPipeline):
    """One call samples a diffdistill student: ``pipe(batch_size=4, generator=torch.Generator().manual_seed(0))``.

    Load with ``DiffDistillPipeline.from_pretrained(folder)``: ``model_index.json`` names the
    ``diffdistill.export`` classes, so no ``trust_remote_code`` is involved.
    """

    model_cpu_offload_seq = "student"

    def __init__(self, student: DiffDistillGeneratorModel) -> None:
        super().__init__()
        self.register_modules(student=student)

    def load_lora(self, model_id: str, subfolder: str | None = None, fuse: bool = True) -> None:
        """Apply an exported LoRA adapter (``load_lora(<export>, subfolder="lora")``) to the student."""
        self.student.load_lora(model_id, subfolder, fuse)

    def _sigmas(self, num_inference_steps: int | None, sigmas: list[float] | None) -> list[float]:
        recipe = [float(s) for s in self.student.generator.sampling_sigmas]
        if sigmas is not None:
            out = [float(s) for s in sigmas]
            if not out or any(b >= a for a, b in zip(out, out[1:])) or out[-1] <= 0:
                raise ValueError(f"sigmas must be a non-empty, strictly decreasing list of positive values, got {out}")
            return out
        if num_inference_steps is None:
            return recipe
        if not 1 <= num_inference_steps <= len(recipe):
            raise ValueError(
                f"this student's recipe has {len(recipe)} sigmas {recipe}: num_inference_steps must lie in "
                f"[1, {len(recipe)}] (or pass sigmas=[...])"
            )
        return recipe[:num_inference_steps]

    def _labels(self, class_labels: Any, batch_size: int, generator: TorchGenerator, device) -> Tensor | None:
        n = self.student.config.num_classes
        if n is None:
            if class_labels is not None:
                raise ValueError("this student is unconditional: class_labels must be None")
            return None
        if class_labels is None:  # random real classes, never the null class
            gens = generator if isinstance(generator, list) else [generator] * batch_size
            if len(gens) != batch_size:
                raise ValueError(f"got {len(gens)} generators for a batch of {batch_size}")
            labels = torch.cat([torch.randint(0, n, (1,), generator=g, device=_gen_device(g)).cpu() for g in gens])
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).cpu()
            if labels.numel() == 1 and batch_size > 1:
                labels = labels.expand(batch_size).clone()
            if labels.numel() != batch_size:
                raise ValueError(f"got {labels.numel()} class labels for a batch of {batch_size}")
            top = n if self.student.config.null_class else n - 1
            if labels.min() < 0 or labels.max() > top:
                extra = f" ({n} = the null class)" if self.student.config.null_class else ""
                raise ValueError(f"class labels must lie in [0, {top}]{extra}, got {labels.tolist()}")
        return labels.to(device)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: int | list[int] | Tensor | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        gamma: float | None = None,
        guidance_scale: float | None = None,
        generator: TorchGenerator = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample ``batch_size`` outputs.

        Args:
            class_labels: one label or one per sample; ``None`` draws random real classes from ``generator``.
            num_inference_steps: the first ``n`` sigmas of the recipe (default: all of them).
            sigmas: an explicit, decreasing sigma list (overrides ``num_inference_steps``).
            gamma: TCD gamma (default: the recipe's; ``None`` there means consistency multistep sampling).
            guidance_scale: ``w`` of a guidance-embedded student (default: the recipe's ``w_default``).
            generator: a ``torch.Generator`` (or one per sample for multistep sampling).
            latents: unit Gaussian noise ``[B, *sample_shape]`` instead of drawing it (scaled by ``sigmas[0]`` here).
            output_type: ``"pil"``, ``"np"`` (``[B, H, W, C]`` in ``[0, 1]``), ``"pt"`` (``[B, C, H, W]`` in
                ``[0, 1]``) or ``"latent"`` (the raw samples, in the data's ``[-1, 1]`` scale). Non-image students
                (vectors) return raw samples for ``"pt"`` and ``"np"``.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        gen: Generator = self.student.generator
        device, dtype = self._execution_device, self.student.dtype
        steps = self._sigmas(num_inference_steps, sigmas)
        gamma = self.student.config.gamma if gamma is None else float(gamma)
        shape = (batch_size, *gen.sample_shape)
        if latents is None:
            z = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            z = latents.to(device=device, dtype=dtype)
        labels = self._labels(class_labels, batch_size, generator, device)
        w = None
        if guidance_scale is not None:
            if self.student.config.guidance is None:
                raise ValueError("this student has no guidance embedding: guidance_scale must be None")
            w = torch.full((batch_size,), float(guidance_scale), device=device)
        cond = Conditioning(class_labels=labels, guidance_scale=w)
        if gamma is None:
            # the noise of each further step, drawn like the latents (CPU generators work for any device)
            noise = [randn_tensor(shape, generator=generator, device=device, dtype=dtype) for _ in steps[1:]]
            prior = gen.prior_std(float(steps[0]))
            x = multistep_sample(gen.denoise, z, steps, cond, noise=noise, sigma_min=gen.renoise_floor, prior_std=prior)
        else:
            if isinstance(generator, list) or (generator is not None and generator.device.type != z.device.type):
                raise ValueError(f"TCD sampling needs one torch.Generator on the pipeline's device ({z.device.type})")
            x = gen.sample(z, cond, steps, generator=generator, gamma=gamma)
        images = self._postprocess(x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _postprocess(self, x: Tensor, output_type: str):
        if output_type == "latent":
            return x
        if x.ndim != 4:  # not an image: raw samples
            if output_type == "pil":
                raise ValueError(f"samples of shape {tuple(x.shape[1:])} are not images: use output_type='pt' or 'np'")
            return x if output_type == "pt" else x.float().cpu().numpy()
        x = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return x
        arr = x.float().cpu().permute(0, 2, 3, 1).numpy()
        return arr if output_type == "np" else self.numpy_to_pil(arr)


def _gen_device(g: torch.Generator | None) -> str:
    return "cpu" if g is None else g.device.type
