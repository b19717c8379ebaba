"""Stable Diffusion family ``UNet2DConditionModel`` (SD 1.x / 2.x / SDXL; eps or v prediction) as an EDM denoiser.

EDM view of VP (docs/architecture.md §1): ``x_vp = alpha x0 + s eps`` is ``x = x_vp / alpha``, ``sigma = s / alpha``.
The adapter maps ``sigma`` to the (fractional, optionally quantised) DDPM timestep, feeds ``alpha x`` and the prompt
embeddings to the UNet (SDXL: plus the pooled embedding and six time ids) and converts its output to ``x0_hat``.
Its null condition (the empty prompt's embeddings, or zeros) is stored with the weights, so a saved adapter guides
without its text encoders. :func:`sd_teacher` builds the teacher of a whole pipeline: the adapter, its
:class:`~diffdistill.models.text.PromptEncoder` and its :class:`~diffdistill.models.latent.LatentCodec`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from diffdistill.models.adapters.diffusers_vp import vp_inputs, vp_schedule, vp_to_x0
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.denoiser import Denoiser

PREDICTION_TYPES = ("epsilon", "v_prediction")
GUIDANCE_EMBED_DIM = 256  # LCM's w_embedding_dim (diffusers examples/consistency_distillation)


def guidance_scale_embedding(w: Tensor, embedding_dim: int = GUIDANCE_EMBED_DIM, dtype=torch.float32) -> Tensor:
    """Sinusoidal embedding of a ``[B]`` guidance value, exactly diffusers'
    ``StableDiffusionPipeline.get_guidance_scale_embedding`` (from VDM): frequencies ``10000^(-k / (half - 1))``
    of ``1000 w``; the pipelines call it with ``w = guidance_scale - 1``."""
    if w.ndim != 1:
        raise ValueError(f"guidance values must be [B], got shape {tuple(w.shape)}")
    w = w * 1000.0
    half = embedding_dim // 2
    freq = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w.to(dtype)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class DiffusersSDDenoiser(Denoiser):
    """Wrap an SD-family ``UNet2DConditionModel`` (attribute ``.unet``) in the EDM convention.

    Args:
        unet: the diffusers ``UNet2DConditionModel``.
        alphas_cumprod: the training schedule's ``abar_t`` (its ``DDPMScheduler``).
        prediction_type: ``epsilon`` or ``v_prediction`` (the scheduler config's field).
        quantize: round timesteps to integers (the network only saw integer timesteps).
        sigma_data: data std in the EDM view (1.0: SD latents are scaled to about unit variance).
        null_prompt: the model's null condition, batch 1 (``prompt_embeds [1, L, D]``, SDXL also
            ``pooled_prompt_embeds [1, D]``); stored as buffers ``null_prompt_embeds`` / ``null_pooled_prompt_embeds``.
        vae_scale_factor: pixels per latent (SDXL's default time ids are in pixels of the decoded image).
    """

    feature_pass_cost: float = 0.5  # what ``features`` costs in forwards of the whole UNet (encoder + mid block)

    def __init__(
        self,
        unet: nn.Module,
        alphas_cumprod: Tensor,
        prediction_type: str = "epsilon",
        quantize: bool = False,
        sigma_data: float = 1.0,
        null_prompt: Conditioning | None = None,
        vae_scale_factor: int = 8,
    ):
        super().__init__()
        self.unet, self.prediction_type = unet, prediction_type
        self.schedule = vp_schedule(alphas_cumprod, prediction_type, quantize, PREDICTION_TYPES)
        self.sigma_data = float(sigma_data)
        self.sigma_min, self.sigma_max = self.schedule.sigma_min, self.schedule.sigma_max
        self.vae_scale_factor = int(vae_scale_factor)
        self.is_sdxl = unet.config.addition_embed_type == "text_time"
        embeds = None if null_prompt is None else null_prompt.prompt_embeds
        pooled = None if null_prompt is None else null_prompt.pooled_prompt_embeds
        if embeds is not None and (embeds.ndim != 3 or embeds.shape[0] != 1):
            raise ValueError(f"null prompt embeddings must be [1, L, D], got {tuple(embeds.shape)}")
        if self.is_sdxl and embeds is not None and pooled is None:
            raise ValueError("an SDXL UNet's null prompt needs pooled_prompt_embeds [1, D] as well")
        self.register_buffer("null_prompt_embeds", None if embeds is None else embeds.detach().clone().float())
        self.register_buffer("null_pooled_prompt_embeds", None if pooled is None else pooled.detach().clone().float())
        object.__setattr__(self, "_guidance_on", unet.config.time_cond_proj_dim is not None)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        subfolder: str | None = "unet",
        scheduler_subfolder: str | None = "scheduler",
        quantize: bool = False,
        sigma_data: float = 1.0,
        prompt_encoder=None,
        **kw,
    ) -> DiffusersSDDenoiser:
        """Load the UNet and training schedule of a pipeline folder or hub id
        (``stable-diffusion-v1-5/stable-diffusion-v1-5``); the null prompt is computed with the pipeline's text
        encoder(s) (or ``prompt_encoder``), the VAE's scale factor read from its config.

        Nothing is downloaded unless ``path`` is a hub id and the hub is reachable (``HF_HUB_OFFLINE`` unset).
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel

        from diffdistill.models.io import local_or_hub

        path = str(local_or_hub(path))
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, **kw)
            sched = DDPMScheduler.from_pretrained(path, subfolder=scheduler_subfolder)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"could not load a diffusers UNet2DConditionModel + scheduler from '{path}': {e}"
            ) from e
        if prompt_encoder is None and _has_text_encoder(path):
            from diffdistill.models.text import PromptEncoder

            prompt_encoder = PromptEncoder.from_pretrained(path)
        null = None if prompt_encoder is None else prompt_encoder.null_prompt.to("cpu")
        prediction_type = sched.config.prediction_type
        return cls(unet, sched.alphas_cumprod, prediction_type, quantize, sigma_data, null, _vae_scale_factor(path))

    @classmethod
    def from_config(
        cls,
        unet_config: dict,
        alphas_cumprod: list[float],
        prediction_type: str = "epsilon",
        quantize: bool = False,
        sigma_data: float = 1.0,
        null_prompt_shape: list[int] | None = None,
        null_pooled_shape: list[int] | None = None,
        vae_scale_factor: int = 8,
        guidance_embedding: bool = False,
    ) -> DiffusersSDDenoiser:
        """The architecture alone (random weights, zero null prompt), as a saved model folder records it; the
        weights and null-prompt buffers then load from ``model.safetensors``."""
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(dict(unet_config))
        null = None
        if null_prompt_shape is not None:
            pooled = None if null_pooled_shape is None else torch.zeros(null_pooled_shape)
            null = Conditioning(prompt_embeds=torch.zeros(null_prompt_shape), pooled_prompt_embeds=pooled)
        ac = torch.tensor(alphas_cumprod, dtype=torch.float64)
        den = cls(unet, ac, prediction_type, quantize, sigma_data, null, vae_scale_factor)
        den.guidance_emb = den.unet.time_embedding.cond_proj if guidance_embedding else None
        return den

    def to_config(self) -> dict:
        return {
            "_target_": "diffdistill.models.adapters.sd.DiffusersSDDenoiser.from_config",
            "unet_config": {k: v for k, v in self.unet.config.items() if not k.startswith("_")},
            "alphas_cumprod": self.schedule.alphas_cumprod.double().cpu().tolist(),
            "prediction_type": self.prediction_type,
            "quantize": self.schedule.quantize,
            "sigma_data": self.sigma_data,
            "null_prompt_shape": None if self.null_prompt_embeds is None else list(self.null_prompt_embeds.shape),
            "null_pooled_shape": (
                None if self.null_pooled_prompt_embeds is None else list(self.null_pooled_prompt_embeds.shape)
            ),
            "vae_scale_factor": self.vae_scale_factor,
            "guidance_embedding": self.guidance_emb is not None,
        }

    # ------------------------------------------------------------------ guidance embedding (LCM students)

    @property
    def guidance_emb(self) -> nn.Module | None:
        """The guidance embedding when on: the UNet's own ``time_embedding.cond_proj`` (fed
        ``get_guidance_scale_embedding(w - 1)``), so the student loads in a stock pipeline; ``None`` when off."""
        return self.unet.time_embedding.cond_proj if self._guidance_on else None

    @guidance_emb.setter
    def guidance_emb(self, value: nn.Module | None) -> None:
        if value is not None and self.unet.time_embedding.cond_proj is None:
            raise ValueError("this UNet has no time_cond_proj_dim: call enable_guidance_embedding() first")
        object.__setattr__(self, "_guidance_on", value is not None)

    def __setattr__(self, name, value):
        if name == "guidance_emb":  # a property, also when given a module (nn.Module would register it)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def enable_guidance_embedding(self, dim: int = GUIDANCE_EMBED_DIM) -> None:
        """Condition the UNet on the guidance scale as LCM's students are (Luo et al. 2023): the UNet's
        ``time_cond_proj_dim`` (``dim`` unless already set) with a zero-initialised ``time_embedding.cond_proj``,
        so the output is unchanged until it is trained. Added in place (adapters and weights kept); the UNet
        config records it, so a saved or exported UNet rebuilds it."""
        emb = self.unet.time_embedding
        if emb.cond_proj is None:
            p = next(self.unet.parameters())
            emb.cond_proj = nn.Linear(dim, emb.linear_1.in_features, bias=False).to(p.device, p.dtype)
            nn.init.zeros_(emb.cond_proj.weight)
            self.unet.register_to_config(time_cond_proj_dim=dim)
        self.guidance_emb = emb.cond_proj

    # ------------------------------------------------------------------ the denoiser

    @property
    def null_prompt(self) -> Conditioning | None:
        if self.null_prompt_embeds is None:
            return None
        return Conditioning(prompt_embeds=self.null_prompt_embeds, pooled_prompt_embeds=self.null_pooled_prompt_embeds)

    def prior_std(self, sigma: float | Tensor) -> float | Tensor:
        """``sqrt(1 + sigma^2)``: unit noise in VP space (``x_vp = alpha x = z``), where diffusers pipelines start."""
        if torch.is_tensor(sigma):
            return (1 + sigma**2).sqrt()
        return math.sqrt(1.0 + float(sigma) ** 2)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        s = c.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return (c.in_channels, h, w)

    def default_time_ids(self, x: Tensor) -> Tensor:
        """SDXL's micro-conditions ``(original H, W, crop top, left, target H, W)`` for an uncropped image of the
        decoded size (``pipeline_stable_diffusion_xl.py`` ``_get_add_time_ids`` with its defaults)."""
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        return torch.tensor([h, w, 0, 0, h, w], dtype=x.dtype, device=x.device).expand(x.shape[0], 6)

    def _unet_kwargs(self, x: Tensor, cond: Conditioning) -> dict:
        b, dtype = x.shape[0], self.unet.dtype
        embeds, pooled = cond.prompt_embeds, cond.pooled_prompt_embeds
        if embeds is None:  # an unconditional call: the null prompt
            if self.null_prompt_embeds is None:
                raise ValueError("this UNet needs cond.prompt_embeds (it stores no null prompt to fall back on)")
            embeds, pooled = self.null_prompt_embeds, self.null_pooled_prompt_embeds
        embeds = embeds.expand(b, *embeds.shape[1:]) if embeds.shape[0] == 1 else embeds
        kw = {"encoder_hidden_states": embeds.to(dtype)}
        if self.is_sdxl:
            if pooled is None:
                raise ValueError("an SDXL UNet needs cond.pooled_prompt_embeds [B, D] with its prompt embeddings")
            pooled = pooled.expand(b, *pooled.shape[1:]) if pooled.shape[0] == 1 else pooled
            time_ids = self.default_time_ids(x) if cond.micro_conds is None else cond.micro_conds
            kw["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        if self.guidance_emb is not None:
            w = torch.ones(b, device=x.device) if cond.guidance_scale is None else cond.guidance_scale.reshape(-1)
            w = w.expand(b) if w.numel() == 1 else w
            dim = self.unet.config.time_cond_proj_dim
            # (LCM) the embedding of omega = w - 1, as pipeline_stable_diffusion.py feeds timestep_cond
            kw["timestep_cond"] = guidance_scale_embedding(w.float() - 1.0, dim).to(dtype)
        return kw

    def denoise(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        x_vp, t, alpha, s = vp_inputs(self.schedule, x, sigma)
        out = self.unet(x_vp.to(self.unet.dtype), t, **self._unet_kwargs(x, cond)).sample.to(x.dtype)
        return vp_to_x0(self.prediction_type, out, x, x_vp, sigma, alpha, s)

    def features(self, x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> list[Tensor]:
        """Output of each down block and of the mid block (discriminator taps); the decoder never runs."""
        from diffdistill.conventions import as_sigma
        from diffdistill.models.backbones import forward_taps
        from diffdistill.models.conditioning import as_conditioning

        sigma, cond = as_sigma(sigma, x.shape[0], x.device), as_conditioning(cond)
        blocks = [*self.unet.down_blocks, *([self.unet.mid_block] if self.unet.mid_block is not None else [])]
        x_vp, t, _, _ = vp_inputs(self.schedule, x, sigma)
        return forward_taps(blocks, lambda: self.unet(x_vp.to(self.unet.dtype), t, **self._unet_kwargs(x, cond)))


def _has_text_encoder(path: str) -> bool:
    from diffdistill.models.text import read_model_index

    try:
        index = read_model_index(path)
    except FileNotFoundError:
        return False
    return index.get("text_encoder") is not None and index["text_encoder"][0] is not None


def _vae_scale_factor(path: str) -> int:
    """``2 ** (len(vae.config.block_out_channels) - 1)`` as the pipelines compute it (8 when there is no VAE)."""
    from diffusers import AutoencoderKL

    try:
        cfg = AutoencoderKL.load_config(path, subfolder="vae")
    except (OSError, ValueError):
        return 8
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def packaged_pipeline(path: str | Path) -> str | Path:
    """``path``, or the folder of the packaged text-to-image teacher of that name (``fashion_mnist_t2i``) when no such
    file or folder exists here."""
    from diffdistill.utils.paths import ASSETS

    packaged = ASSETS / "teachers" / str(path)
    if not Path(path).expanduser().exists() and (packaged / "model_index.json").is_file():
        return packaged
    return path


def sd_teacher(
    path: str | Path,
    guidance_scale: float = 1.0,
    quantize: bool = False,
    sigma_data: float = 1.0,
    cache_dir: str | Path | None = None,
):
    """The teacher of an SD / SDXL pipeline (folder, hub id, or the name of a packaged teacher such as
    ``fashion_mnist_t2i``): a frozen :class:`DiffusersSDDenoiser` with CFG at
    ``guidance_scale``, carrying its frozen ``prompt_encoder`` (:class:`~diffdistill.models.text.PromptEncoder`,
    embeddings cached in memory and, with ``cache_dir``, on disk) and ``latent``
    (:class:`~diffdistill.models.latent.LatentCodec`)."""
    from diffdistill.models.latent import LatentCodec
    from diffdistill.models.teacher import Teacher
    from diffdistill.models.text import PromptEncoder, pipeline_kind

    path = packaged_pipeline(path)
    kind = pipeline_kind(path)
    if kind not in ("sd", "sdxl"):
        raise ValueError(f"'{path}' is a '{kind}' pipeline; sd_teacher loads SD 1.x / 2.x / SDXL pipelines")
    prompt_encoder = PromptEncoder.from_pretrained(path, kind=kind, cache_dir=cache_dir)
    den = DiffusersSDDenoiser.from_pretrained(
        path, quantize=quantize, sigma_data=sigma_data, prompt_encoder=prompt_encoder
    )
    teacher = Teacher(den, guidance_scale)
    teacher.prompt_encoder = prompt_encoder.requires_grad_(False)
    teacher.latent = LatentCodec.from_pretrained(path).requires_grad_(False)
    return teacher
