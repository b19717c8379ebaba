"""Flow-matching transformers (SD3, Flux) as EDM denoisers.

Rectified flow (Esser et al. 2024, "Scaling Rectified Flow Transformers", arXiv:2403.03206, §2-3, ``a_t = 1-t``,
``b_t = t``): ``x_rf = (1-u) x0 + u eps`` and the network predicts the velocity ``v = eps - x0``, so
``x0_hat = x_rf - u v``.
EDM view (docs/architecture.md §1): ``x = x_rf / (1-u)``, ``sigma = u / (1-u)``; the native time the transformer
sees is ``1000 u`` for SD3 (what ``FlowMatchEulerDiscreteScheduler.timesteps`` holds) and ``u`` for Flux (its
pipeline divides by 1000).

The resolution shift ``u' = s u / (1 + (s-1) u)`` (SD3 §5.3.2, Eq. 23; diffusers' scheduler ``shift``, Flux's
dynamic ``mu`` with ``s = e^mu``) acts on the *distribution of u* (the sampler's grid, the training density), not
on the network call: in the EDM view it is ``sigma' = s sigma`` (:func:`~diffdistill.schedules.flow.shift_sigma`).
:meth:`DiffusersFlowDenoiser.shifted_sigmas` gives the scheduler's own grid; :meth:`~DiffusersFlowDenoiser.shift`
the factor an objective multiplies its sampled sigmas by to train where the teacher was trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffdistill.conventions import edm_to_rf, flow_to_x0
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.denoiser import Denoiser
from diffdistill.schedules.flow import calculate_shift, dynamic_shift_factor, sigma_to_u, u_to_sigma

# FlowMatchEulerDiscreteScheduler's defaults (diffusers schedulers/scheduling_flow_match_euler_discrete.py)
SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=False,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)


def _plain_config(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


class DiffusersFlowDenoiser(Denoiser):
    """Wrap a diffusers ``SD3Transformer2DModel`` (attribute ``.transformer``) as ``D(x, sigma, cond) -> x0_hat``.

    Args:
        transformer: the ``SD3Transformer2DModel``.
        scheduler_config: the pipeline's ``FlowMatchEulerDiscreteScheduler`` config (``shift``,
            ``use_dynamic_shifting`` and Flux's ``base_shift`` / ``max_shift`` / ``*_image_seq_len``); missing keys
            take the scheduler's defaults.
        sigma_data: data std in the EDM view (1.0: SD3 latents are scaled to unit variance by the VAE's
            ``scaling_factor`` / ``shift_factor``).
        null_prompt_embeds: ``[1, L, D]`` embeddings of the empty prompt (the unconditional side of CFG).
        null_pooled_prompt_embeds: ``[1, P]`` pooled embedding of the empty prompt.
        feature_blocks: indices of the transformer blocks whose image-token outputs :meth:`features` returns
            (default: three evenly spaced blocks: a third of the way, two thirds, the last).

    Noise range: ``sigma_min`` is the scheduler's smallest training ``u`` (``shift(1/N)``, N = 1000), and
    ``sigma_max`` comes from ``u_max = 1 - 1/N``. The scheduler's own first level is ``u = 1`` (pure noise), where
    the EDM view is singular (``x = x_rf / (1-u)``, ``sigma = inf``); one native timestep below it the input is still
    exactly the pipeline's (``prior_std`` makes ``x_rf = z``) and only the timestep fed to the network differs by
    1/N. :meth:`shifted_sigmas` clamps the grid's first entry to ``sigma_max`` for the same reason.
    """

    def __init__(
        self,
        transformer: nn.Module,
        scheduler_config: dict | None = None,
        sigma_data: float = 1.0,
        null_prompt_embeds: Tensor | None = None,
        null_pooled_prompt_embeds: Tensor | None = None,
        feature_blocks: list[int] | None = None,
    ):
        super().__init__()
        self.transformer = transformer
        self.scheduler_config = {**SCHEDULER_DEFAULTS, **dict(scheduler_config or {})}
        if not float(self.scheduler_config["shift"]) > 0:
            raise ValueError(f"the scheduler's shift must be > 0, got {self.scheduler_config['shift']}")
        self.num_train_timesteps = int(self.scheduler_config["num_train_timesteps"])
        self.sigma_data = float(sigma_data)
        n, s = self.num_train_timesteps, self.shift()
        self.sigma_min = float(u_to_sigma(torch.tensor(s * (1 / n) / (1 + (s - 1) / n), dtype=torch.float64)))
        self.sigma_max = float(u_to_sigma(torch.tensor(1 - 1 / n, dtype=torch.float64)))
        self.register_buffer("null_prompt_embeds", None)
        self.register_buffer("null_pooled_prompt_embeds", None)
        if null_prompt_embeds is not None or null_pooled_prompt_embeds is not None:
            self.set_null_prompt(null_prompt_embeds, null_pooled_prompt_embeds)
        n_blocks = len(self._blocks())
        self.feature_blocks = sorted(
            {int(b) % n_blocks for b in feature_blocks}
            if feature_blocks is not None
            else {round(i * (n_blocks - 1) / 3) for i in range(1, 4)}
        )

    # ----------------------------------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        subfolder: str | None = "transformer",
        scheduler_subfolder: str | None = "scheduler",
        null_prompt: bool = True,
        sigma_data: float = 1.0,
        feature_blocks: list[int] | None = None,
        **kw,
    ) -> DiffusersFlowDenoiser:
        """Load the transformer and its scheduler config from a diffusers pipeline folder or hub id.

        ``null_prompt``: encode the empty prompt with the folder's text encoders (:class:`SD3PromptEncoder`) when
        the local folder has them (:func:`sd3_teacher` always does). Nothing is downloaded unless ``path`` is a hub
        id and the hub is reachable.
        """
        from diffusers import SD3Transformer2DModel

        from diffdistill.models.io import local_or_hub

        path = local_or_hub(path)
        transformer, config = _load_pretrained(SD3Transformer2DModel, "an", path, subfolder, scheduler_subfolder, **kw)
        null = (None, None)
        if null_prompt and (Path(path) / "text_encoder").is_dir():
            from diffdistill.models.adapters.sd3 import SD3PromptEncoder

            c = SD3PromptEncoder.from_pretrained(path).null_prompt
            null = (c.prompt_embeds, c.pooled_prompt_embeds)
        return cls(transformer, config, sigma_data, *null, feature_blocks)

    @classmethod
    def from_config(
        cls,
        transformer_config: dict,
        scheduler_config: dict | None = None,
        sigma_data: float = 1.0,
        null_prompt_shape: list[int] | None = None,
        null_pooled_dim: int | None = None,
        feature_blocks: list[int] | None = None,
    ) -> DiffusersFlowDenoiser:
        """The architecture alone (random weights, zero null prompt buffers), as a saved model folder records it."""
        from diffusers import SD3Transformer2DModel

        return cls(
            SD3Transformer2DModel.from_config(transformer_config),
            scheduler_config,
            sigma_data,
            *_null_buffers(null_prompt_shape, null_pooled_dim),
            feature_blocks,
        )

    def to_config(self) -> dict:
        null = self.null_prompt_embeds
        return {
            "_target_": f"{type(self).__module__}.{type(self).__name__}.from_config",
            "transformer_config": _plain_config(self.transformer.config),
            "scheduler_config": self.scheduler_config,
            "sigma_data": self.sigma_data,
            "null_prompt_shape": None if null is None else list(null.shape[1:]),
            "null_pooled_dim": None if null is None else int(self.null_pooled_prompt_embeds.shape[1]),
            "feature_blocks": list(self.feature_blocks),
        }

    # ----------------------------------------------------------------------------------------- noise levels

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def image_seq_len(self, sample_shape: tuple[int, ...] | None = None) -> int:
        """Image tokens of a latent of ``sample_shape`` (``(C, H, W)``, default the model's), as Flux's ``mu``
        counts them."""
        _, h, w = sample_shape or self.sample_shape
        p = self.transformer.config.patch_size
        return (h // p) * (w // p)

    def mu(self, sample_shape: tuple[int, ...] | None = None) -> float:
        """Flux's dynamic shift ``mu`` for a latent of ``sample_shape`` (``calculate_shift`` with the scheduler's
        ``base/max_shift`` and ``base/max_image_seq_len``)."""
        c = self.scheduler_config
        return calculate_shift(
            self.image_seq_len(sample_shape),
            c["base_image_seq_len"],
            c["max_image_seq_len"],
            c["base_shift"],
            c["max_shift"],
        )

    def shift(self, sample_shape: tuple[int, ...] | None = None, mu: float | None = None) -> float:
        """The time-shift factor ``s`` of this teacher: the scheduler's static ``shift`` (SD3: 3.0), or with
        ``use_dynamic_shifting`` ``e^mu`` (``mu`` given, or :meth:`mu` of ``sample_shape``). In the EDM view the
        shift is ``sigma -> s sigma``; it moves the sampling grid and the training density, not the network."""
        c = self.scheduler_config
        if not c["use_dynamic_shifting"]:
            if mu is not None:
                raise ValueError("mu is only used with use_dynamic_shifting (this scheduler's shift is static)")
            return float(c["shift"])
        return dynamic_shift_factor(self.mu(sample_shape) if mu is None else mu, c["time_shift_type"])

    def scheduler(self):
        """A fresh ``FlowMatchEulerDiscreteScheduler`` with this teacher's config (for export and tests)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)

    def shifted_sigmas(
        self,
        num_steps: int | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        sample_shape: tuple[int, ...] | None = None,
    ) -> Tensor:
        """The EDM sigmas of the scheduler's own sampling grid, ``num_steps + 1`` entries ending in 0.

        Runs ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)`` (with dynamic
        shifting ``mu`` defaults to :meth:`mu` of ``sample_shape``) and maps its ``u`` grid through
        ``sigma = u / (1-u)``. ``u = 1`` (the default grid's first level) maps to ``sigma_max`` (class docstring).
        """
        sched = self.scheduler()
        if self.scheduler_config["use_dynamic_shifting"] and mu is None:
            mu = self.mu(sample_shape)
        sched.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
        u = sched.sigmas.double().clamp(max=sigma_to_u(torch.tensor(self.sigma_max, dtype=torch.float64)))
        return u_to_sigma(u).float()

    def pipeline_sigmas(
        self, sigmas: list[float] | Tensor, mu: float | None = None, sample_shape: tuple[int, ...] | None = None
    ) -> list[float]:
        """The inverse of :meth:`shifted_sigmas`: the ``sigmas=`` to hand a stock pipeline (``pipe(sigmas=...)``,
        ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)``) so that, after the scheduler's own shift, it
        steps through the EDM levels ``sigmas`` (a trailing 0 is dropped: the scheduler appends it). Since the shift
        is ``sigma -> s sigma``, these are the flow times of ``sigma / s``."""
        c = self.scheduler_config
        if any(c.get(k) for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
            raise ValueError("pipeline_sigmas inverts the time shift only; this scheduler also remaps its sigmas")
        if c["use_dynamic_shifting"] and mu is None:
            mu = self.mu(sample_shape)
        s = self.shift(sample_shape, mu if c["use_dynamic_shifting"] else None)
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
        if len(sigmas) and sigmas[-1] == 0:
            sigmas = sigmas[:-1]
        if (sigmas <= 0).any():
            raise ValueError(f"pipeline sigmas must be > 0 before the trailing 0, got {sigmas.tolist()}")
        return sigma_to_u(sigmas / s).tolist()

    def timestep(self, sigma: Tensor) -> Tensor:
        """The native time the transformer is fed at ``sigma``: ``N u`` (SD3's ``FlowMatchEulerDiscreteScheduler``
        timesteps, N = ``num_train_timesteps``)."""
        return sigma_to_u(sigma) * self.num_train_timesteps

    def prior_std(self, sigma: float | Tensor) -> float | Tensor:
        """``1 + sigma``: unit noise ``z`` at ``sigma`` is ``x_rf = (1-u) x = z``, what the pipelines start from."""
        return 1 + sigma

    # ----------------------------------------------------------------------------------------- conditioning

    def set_null_prompt(self, prompt_embeds: Tensor, pooled_prompt_embeds: Tensor) -> None:
        """Store the empty prompt's embeddings (``[1, L, D]``, ``[1, P]``) as the unconditional side of CFG."""
        if prompt_embeds is None or pooled_prompt_embeds is None:
            raise ValueError("give both null_prompt_embeds and null_pooled_prompt_embeds, or neither")
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1 or pooled_prompt_embeds.shape[:1] != (1,):
            raise ValueError(
                "null prompt embeddings must be [1, L, D] and [1, P], got "
                f"{tuple(prompt_embeds.shape)} and {tuple(pooled_prompt_embeds.shape)}"
            )
        self.null_prompt_embeds = prompt_embeds.detach().float().clone()
        self.null_pooled_prompt_embeds = pooled_prompt_embeds.detach().float().clone()

    @property
    def null_prompt(self) -> Conditioning | None:
        if self.null_prompt_embeds is None:
            return None
        return Conditioning(prompt_embeds=self.null_prompt_embeds, pooled_prompt_embeds=self.null_pooled_prompt_embeds)

    def _prompt(self, cond: Conditioning, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        embeds, pooled = cond.prompt_embeds, cond.pooled_prompt_embeds
        if embeds is None:
            if self.null_prompt_embeds is None:
                raise ValueError(
                    f"{type(self).__name__} needs cond.prompt_embeds and cond.pooled_prompt_embeds (encode prompts "
                    "with SD3PromptEncoder), or null prompt buffers to run unconditionally"
                )
            embeds = self.null_prompt_embeds.expand(batch, -1, -1)
            pooled = self.null_pooled_prompt_embeds.expand(batch, -1)
        if pooled is None:
            raise ValueError(f"{type(self).__name__} needs cond.pooled_prompt_embeds beside cond.prompt_embeds")
        return embeds.to(dtype), pooled.to(dtype)

    # ----------------------------------------------------------------------------------------- network

    def _blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    def velocity(self, x_rf: Tensor, u: Tensor, cond: Conditioning) -> Tensor:
        """The transformer's output ``v = eps - x0`` at the native sample ``x_rf`` and flow time ``u``."""
        dtype = self.transformer.dtype
        embeds, pooled = self._prompt(cond, x_rf.shape[0], dtype)
        return self.transformer(
            hidden_states=x_rf.to(dtype),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=(u * self.num_train_timesteps).to(dtype),
            return_dict=False,
        )[0]

    def denoise(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        x_rf, u = edm_to_rf(x, sigma)  # x_rf = (1-u) x, u = sigma / (1 + sigma)
        v = self.velocity(x_rf, u, cond).to(x.dtype)
        # (Esser et al. 2024, §3, rectified flow) x_rf = (1-u) x0 + u eps, v = eps - x0  =>  x0 = x_rf - u v
        return flow_to_x0(x_rf, v, u)

    def features(self, x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> list[Tensor]:
        """Image-token outputs of the blocks in ``feature_blocks``, as ``[B, inner_dim, H/p, W/p]`` maps; the
        blocks after the last tap (and the output head) never run."""
        from diffdistill.conventions import as_sigma
        from diffdistill.models.conditioning import as_conditioning

        sigma = as_sigma(sigma, x.shape[0], x.device)
        cond = as_conditioning(cond)
        x_rf, u = edm_to_rf(x, sigma)
        t, dtype = self.transformer, self.transformer.dtype
        embeds, pooled = self._prompt(cond, x.shape[0], dtype)
        h, w = x.shape[-2] // t.config.patch_size, x.shape[-1] // t.config.patch_size
        # the opening of SD3Transformer2DModel.forward (diffusers models/transformers/transformer_sd3.py)
        hidden = t.pos_embed(x_rf.to(dtype))
        temb = t.time_text_embed((u * self.num_train_timesteps).to(dtype), pooled)
        context = t.context_embedder(embeds)
        taps = []
        for i, block in enumerate(t.transformer_blocks[: self.feature_blocks[-1] + 1]):
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
            if i in self.feature_blocks:
                taps.append(hidden.transpose(1, 2).reshape(hidden.shape[0], -1, h, w))
        return taps


class DiffusersFluxDenoiser(DiffusersFlowDenoiser):
    """A Flux-shaped ``FluxTransformer2DModel`` (attribute ``.transformer``) as an EDM denoiser.

    Same flow as :class:`DiffusersFlowDenoiser`; what differs is the network call, as diffusers'
    ``pipelines/flux/pipeline_flux.py`` makes it: latents ``[B, C, H, W]`` are packed into 2x2 patches
    (``[B, HW/4, 4C]``, ``_pack_latents``) with ``img_ids`` ``(0, row, col)`` and all-zero ``txt_ids``, the timestep
    is ``u`` (the pipeline divides by 1000; the model multiplies back), and guidance-distilled models (Flux-dev,
    ``guidance_embeds``) take the scale ``cond.guidance_scale`` (default ``embedded_guidance``) as ``guidance``.

    Args:
        sample_size: latent height = width of :attr:`sample_shape` (the config has none; Flux: 128).
        embedded_guidance: the ``guidance`` fed when ``cond.guidance_scale`` is unset (Flux-dev's pipeline: 3.5).
        Others as :class:`DiffusersFlowDenoiser`; ``feature_blocks`` index the joint blocks, then the single ones.
    """

    def __init__(
        self,
        transformer: nn.Module,
        scheduler_config: dict | None = None,
        sigma_data: float = 1.0,
        null_prompt_embeds: Tensor | None = None,
        null_pooled_prompt_embeds: Tensor | None = None,
        feature_blocks: list[int] | None = None,
        sample_size: int = 128,
        embedded_guidance: float = 3.5,
    ):
        self.sample_size, self.embedded_guidance = int(sample_size), float(embedded_guidance)
        if self.sample_size % 2:
            raise ValueError(f"Flux packs 2x2 latent patches: sample_size must be even, got {sample_size}")
        super().__init__(
            transformer, scheduler_config, sigma_data, null_prompt_embeds, null_pooled_prompt_embeds, feature_blocks
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        subfolder: str | None = "transformer",
        scheduler_subfolder: str | None = "scheduler",
        sample_size: int = 128,
        embedded_guidance: float = 3.5,
        sigma_data: float = 1.0,
        feature_blocks: list[int] | None = None,
        **kw,
    ) -> DiffusersFluxDenoiser:
        """Load a ``FluxTransformer2DModel`` and its scheduler config from a diffusers folder or hub id (no null
        prompt: guidance-distilled Flux needs none; set one with :meth:`set_null_prompt` for true CFG)."""
        from diffusers import FluxTransformer2DModel

        from diffdistill.models.io import local_or_hub

        path = local_or_hub(path)
        transformer, config = _load_pretrained(FluxTransformer2DModel, "a", path, subfolder, scheduler_subfolder, **kw)
        return cls(transformer, config, sigma_data, None, None, feature_blocks, sample_size, embedded_guidance)

    @classmethod
    def from_config(
        cls,
        transformer_config: dict,
        scheduler_config: dict | None = None,
        sigma_data: float = 1.0,
        null_prompt_shape: list[int] | None = None,
        null_pooled_dim: int | None = None,
        feature_blocks: list[int] | None = None,
        sample_size: int = 128,
        embedded_guidance: float = 3.5,
    ) -> DiffusersFluxDenoiser:
        from diffusers import FluxTransformer2DModel

        return cls(
            FluxTransformer2DModel.from_config(transformer_config),
            scheduler_config,
            sigma_data,
            *_null_buffers(null_prompt_shape, null_pooled_dim),
            feature_blocks,
            sample_size,
            embedded_guidance,
        )

    def to_config(self) -> dict:
        return {**super().to_config(), "sample_size": self.sample_size, "embedded_guidance": self.embedded_guidance}

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.transformer.config.in_channels // 4, self.sample_size, self.sample_size)

    def image_seq_len(self, sample_shape: tuple[int, ...] | None = None) -> int:
        _, h, w = sample_shape or self.sample_shape
        return (h // 2) * (w // 2)

    def _blocks(self) -> list[nn.Module]:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    def timestep(self, sigma: Tensor) -> Tensor:
        """Flux's network time is ``u`` itself (its pipeline feeds ``t / 1000``)."""
        return sigma_to_u(sigma)

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, HW/4, 4C]`` (``FluxPipeline._pack_latents``)."""
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
        """Inverse of :meth:`pack` (``FluxPipeline._unpack_latents``)."""
        b, _, c4 = tokens.shape
        return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)

    def _inputs(self, x_rf: Tensor, u: Tensor, cond: Conditioning) -> dict:
        dtype = self.transformer.dtype
        b, _, h, w = x_rf.shape
        embeds, pooled = self._prompt(cond, b, dtype)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x_rf.device)  # FluxPipeline._prepare_latent_image_ids
        img_ids[..., 1] += torch.arange(h // 2, device=x_rf.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x_rf.device)[None, :]
        guidance = None
        if self.transformer.config.guidance_embeds:
            g = cond.guidance_scale
            guidance = torch.full((b,), self.embedded_guidance, device=x_rf.device) if g is None else g.reshape(b)
            guidance = guidance.to(dtype)
        return dict(
            hidden_states=self.pack(x_rf.to(dtype)),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=u.to(dtype),
            img_ids=img_ids.reshape(-1, 3).to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x_rf.device, dtype=dtype),
            guidance=guidance,
        )

    def velocity(self, x_rf: Tensor, u: Tensor, cond: Conditioning) -> Tensor:
        out = self.transformer(**self._inputs(x_rf, u, cond), return_dict=False)[0]
        return self.unpack(out, *x_rf.shape[-2:])

    def features(self, x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> list[Tensor]:
        """Image-token outputs of the tapped blocks as ``[B, inner_dim, H/2, W/2]`` maps; the forward stops after
        the last tap."""
        from diffdistill.conventions import as_sigma
        from diffdistill.models.backbones import forward_taps
        from diffdistill.models.conditioning import as_conditioning

        sigma = as_sigma(sigma, x.shape[0], x.device)
        x_rf, u = edm_to_rf(x, sigma)
        blocks = self._blocks()
        h, w = x.shape[-2] // 2, x.shape[-1] // 2

        def image_tokens(output) -> Tensor:  # a joint block returns (context, hidden); the image tokens as a map
            return output[1].transpose(1, 2).reshape(output[1].shape[0], -1, h, w)

        def run():
            return self.transformer(**self._inputs(x_rf, u, as_conditioning(cond)), return_dict=False)

        return forward_taps([blocks[i] for i in self.feature_blocks], run, image_tokens)


def _load_pretrained(
    model_cls, article: str, path, subfolder: str | None, scheduler_subfolder: str | None, **kw
) -> tuple[nn.Module, dict]:
    """A transformer of ``model_cls`` and its ``FlowMatchEulerDiscreteScheduler`` config (plain) from a folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        transformer = model_cls.from_pretrained(str(path), subfolder=subfolder, **kw)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(path), subfolder=scheduler_subfolder)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not load {article} {model_cls.__name__} + FlowMatchEulerDiscreteScheduler from '{path}': {e}"
        ) from e
    return transformer, _plain_config(sched.config)


def _null_buffers(shape: list[int] | None, pooled_dim: int | None) -> tuple[Tensor | None, Tensor | None]:
    if shape is None:
        return None, None
    return torch.zeros(1, *shape), torch.zeros(1, int(pooled_dim))


__all__ = ["DiffusersFlowDenoiser", "DiffusersFluxDenoiser"]
