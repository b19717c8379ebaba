"""SD-family students as stock ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` folders.

A student whose denoiser is a ``DiffusersSDDenoiser`` (possibly inside LCM's boundary wrapper
:class:`~diffdistill.models.consistency.LCMBoundaryDenoiser`, possibly with LoRA adapters) is the teacher pipeline
with the student's UNet and an ``LCMScheduler`` (``TCDScheduler`` for TCD sampling), called with the recipe's
``timesteps``. Why that is exact, in the EDM view ``x = x_vp / alpha``, ``sigma = sqrt(1 - abar) / alpha``:

* the pipeline starts from unit latents ``x_vp = z``; diffdistill's ``Generator.sample`` starts from
  ``prior_std(sigma) z = sqrt(1 + sigma^2) z = z / alpha``, the same point. A student with ``input_noise="sigma"``
  (SiD-LSG) starts from ``sigma z``, i.e. ``x_vp = alpha sigma z = sqrt(1 - abar) z``: the pipeline reproduces it
  when called with ``latents = sqrt(1 - abar_t0) z`` (``SDPlan.latents_scale``; the card shows the call, the
  round-trip check makes it), and a plain call without ``latents`` feeds it unit noise it was not trained on;
* ``LCMScheduler.step`` (diffusers ``scheduling_lcm.py``) returns ``denoised = c_skip x_vp + c_out x0_pred``, which
  is :class:`LCMBoundaryDenoiser`; for students without LCM's boundary (DMD, SiD, ...) ``c_skip`` is below
  ``3e-7`` at the timesteps such students sample (``t >= 200``), so the scheduler adds no visible change, and the
  export's round-trip check measures what it adds;
* it re-noises to ``x_vp = sqrt(abar_prev) denoised + sqrt(1 - abar_prev) eps`` with its own ``randn_tensor`` draw
  per further step (after the latents, from the same ``generator``): ``x = x0 + sigma_prev eps``, diffdistill's
  multistep sampler with the same draws.

The recipe (timesteps, guidance scale, TCD eta) is written into the export's ``diffdistill.json``, the scheduler
config (``_diffdistill_recipe``) and the model card. The VAE, text encoder(s) and tokenizer(s) come from the
teacher's pipeline folder (``base``: the export's argument, else the teacher path recorded in the run metadata).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffdistill.models.conditioning import Conditioning
from diffdistill.models.generator import Generator

SD_PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
TIMESTEP_ATOL = 1e-3  # a sampling sigma must sit this close to an integer timestep
# UNet config entries the teacher pipeline's VAE / text encoders fix (the student may differ elsewhere)
INTERFACE_KEYS = (
    "in_channels",
    "out_channels",
    "sample_size",
    "cross_attention_dim",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)
VERIFY_PROMPTS = ["lower newer", "wider"]


# ---------------------------------------------------------------------------------------------- recognising
def sd_adapter(denoiser: nn.Module) -> nn.Module | None:
    """The ``DiffusersSDDenoiser``-like adapter (a ``UNet2DConditionModel`` ``unet`` and a DDPM ``schedule``) at the
    root of ``denoiser`` or inside one boundary wrapper (``inner``); ``None`` for other students."""
    from diffusers import UNet2DConditionModel

    from diffdistill.schedules.discrete import DDPMSchedule

    for m in (denoiser, getattr(denoiser, "inner", None)):
        if isinstance(getattr(m, "unet", None), UNet2DConditionModel) and isinstance(
            getattr(m, "schedule", None), DDPMSchedule
        ):
            return m
    return None


def is_sd_student(generator: nn.Module) -> bool:
    return isinstance(generator, Generator) and sd_adapter(generator.denoiser) is not None


def boundary_kind(denoiser: nn.Module) -> str:
    """``"lcm"`` (LCM's discrete scalings, what ``LCMScheduler`` applies), ``"none"`` (the adapter itself) or
    ``"song"`` (Song et al.'s ``ConsistencyDenoiser``, which no stock SD scheduler applies)."""
    from diffdistill.models.consistency import ConsistencyDenoiser, LCMBoundaryDenoiser

    if isinstance(denoiser, LCMBoundaryDenoiser):
        return "lcm"
    if isinstance(denoiser, ConsistencyDenoiser):
        return "song"
    return "none"


def recipe_timesteps(schedule, sigmas: list[float]) -> list[int]:
    """The integer DDPM timesteps of the recipe's sigmas; an actionable error for a sigma between timesteps."""
    s = torch.tensor([float(v) for v in sigmas], dtype=torch.float64)
    lo, hi = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    if (s < lo * (1 - 1e-6)).any() or (s > hi * (1 + 1e-6)).any():
        raise ValueError(f"sampling sigmas {sigmas} leave the teacher schedule's range [{lo:.4g}, {hi:.4g}]")
    log_s = s.log().clamp(schedule.log_sigmas[0], schedule.log_sigmas[-1])
    idx = torch.searchsorted(schedule.log_sigmas, log_s).clamp(1, len(schedule.sigmas) - 1)
    a, b = schedule.log_sigmas[idx - 1], schedule.log_sigmas[idx]
    t = (idx - 1).double() + (log_s - a) / (b - a)
    bad = [(float(v), float(u)) for v, u in zip(s, t) if abs(u - round(float(u))) > TIMESTEP_ATOL]
    if bad:
        near = {round(u): float(schedule.sigmas[round(u)]) for _, u in bad}
        raise ValueError(
            f"sampling sigmas {[v for v, _ in bad]} lie at fractional timesteps {[round(u, 3) for _, u in bad]}; the "
            "stock schedulers run integer timesteps: give student.sigma_init / student.sampling_sigmas as sigmas of "
            f"integer timesteps (schedule.sigmas[t]; nearest: {', '.join(f't={k}: {v!r}' for k, v in near.items())})"
        )
    out = [round(float(u)) for u in t]
    if any(b >= a for a, b in zip(out, out[1:])):
        raise ValueError(f"sampling sigmas {sigmas} give timesteps {out}, which are not strictly decreasing")
    return out


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class SDPlan:
    """How the stock pipeline reproduces the student: which pipeline and scheduler, and the call."""

    kind: str  # "sd" | "sdxl"
    base: str
    scheduler: str  # "LCMScheduler" | "TCDScheduler"
    timesteps: list[int]
    guidance_scale: float
    gamma: float | None = None
    reason: str = ""
    original_inference_steps: int | None = None
    warnings: list[str] = field(default_factory=list)
    latents_scale: float | None = None  # input_noise="sigma": call with latents = latents_scale * randn (else unit)

    @property
    def pipeline_class(self) -> str:
        return SD_PIPELINES[self.kind]

    def call_kwargs(self, steps: int | None = None) -> dict[str, Any]:
        """``pipe(prompt, **kwargs)`` for the first ``steps`` timesteps (default: the whole recipe)."""
        n = len(self.timesteps) if steps is None else steps
        kw: dict[str, Any] = {"timesteps": list(self.timesteps[:n]), "guidance_scale": self.guidance_scale}
        if self.gamma is not None:
            kw["eta"] = self.gamma
        return kw


def resolve_base(base: str | Path | None, metadata: dict[str, Any]) -> str:
    """The teacher pipeline folder (or hub id): ``base``, else the teacher path the run metadata records (a local
    pipeline folder, or an ``org/name`` hub id)."""
    from diffdistill.models.adapters.sd import packaged_pipeline
    from diffdistill.models.io import local_or_hub

    if base is not None:
        path = local_or_hub(packaged_pipeline(base))
        if Path(path).exists() and not (Path(path) / "model_index.json").exists():
            raise ValueError(f"base '{base}' is not a diffusers pipeline folder (no model_index.json)")
        return str(path)
    teacher = metadata.get("teacher")
    if isinstance(teacher, str) and teacher:
        local = Path(packaged_pipeline(teacher)).expanduser()  # a packaged teacher's name: its folder
        if (local / "model_index.json").exists():
            return str(local)
        if not local.exists() and teacher.count("/") == 1 and not teacher.startswith((".", "/", "~")):
            return teacher
    raise ValueError(
        "this student exports into its teacher's pipeline (VAE, text encoders, tokenizers): pass "
        "base=<teacher pipeline folder> (diffdistill-export base=...); the run metadata records "
        + (f"teacher {teacher!r}, which is not a pipeline folder" if teacher else "no teacher path")
    )


def lcm_default_timesteps(num_train_timesteps: int, original_steps: int, n: int) -> list[int]:
    """``LCMScheduler.set_timesteps(num_inference_steps=n)`` with ``original_inference_steps`` (diffusers
    ``scheduling_lcm.py``: the ``k = T // original_steps`` training grid, ``n`` evenly spaced indices of it)."""
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return [int(v) for v in origin[idx]]


def original_steps_for(timesteps: list[int], num_train_timesteps: int, prefer: int = 50) -> int | None:
    """An ``original_inference_steps`` whose default ``num_inference_steps=len(timesteps)`` schedule is exactly the
    recipe (so ``pipe(num_inference_steps=n)`` works too), the scheduler's own first; ``None`` if there is none."""
    n = len(timesteps)
    for m in [prefer, *range(n, num_train_timesteps + 1)]:
        if n <= m <= num_train_timesteps and lcm_default_timesteps(num_train_timesteps, m, n) == list(timesteps):
            return m
    return None


def plan_sd(generator: Generator, base: str, gamma: float | None = None) -> SDPlan:
    """Check that the stock pipeline can express ``generator`` and return how (an actionable error otherwise)."""
    from diffdistill.models.backbones import has_guidance_embedding
    from diffdistill.models.text import pipeline_kind

    den = generator.denoiser
    adapter = sd_adapter(den)
    if adapter is None:
        raise ValueError(f"{type(den).__name__} is not an SD-family (DiffusersSDDenoiser) student")
    boundary = boundary_kind(den)
    if boundary == "song":
        raise ValueError(
            "this SD student has Song et al.'s boundary condition (ConsistencyDenoiser), which no stock SD scheduler "
            "applies (LCMScheduler applies LCM's discrete scalings): train it with objective=lcm, whose "
            "prepare_student gives SD students LCM's boundary, or export with a non-SD pipeline"
        )
    kind = pipeline_kind(base)
    if kind not in SD_PIPELINES:
        raise ValueError(f"base '{base}' is a {kind} pipeline; an SD-family UNet student needs an SD or SDXL one")
    unet = adapter.unet
    embedded = has_guidance_embedding(den) or unet.config.time_cond_proj_dim is not None
    if embedded and unet.config.time_cond_proj_dim is None:
        raise ValueError("the student's guidance embedding is not the UNet's time_cond_proj_dim one")
    sigmas = list(generator.sampling_sigmas)
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD gamma must lie in [0, 1], got {gamma}")
    timesteps = recipe_timesteps(adapter.schedule, sigmas)
    T = len(adapter.schedule.sigmas)
    if embedded:
        g = generator.guidance or {}
        w = float(g.get("w_default", 1.0))
    else:
        w = 1.0  # guidance_scale <= 1: the pipeline runs no classifier-free guidance
    reason = (
        f"the student is an SD-family UNet{' with LCM boundary scalings' if boundary == 'lcm' else ''}: the stock "
        f"{SD_PIPELINES[kind]} with {'TCDScheduler' if gamma is not None else 'LCMScheduler'} and timesteps "
        f"{timesteps} runs the same network on the same latents and noise"
    )
    plan = SDPlan(
        kind=kind,
        base=str(base),
        scheduler="TCDScheduler" if gamma is not None else "LCMScheduler",
        timesteps=timesteps,
        guidance_scale=w,
        gamma=gamma,
        reason=reason,
        original_inference_steps=original_steps_for(timesteps, T),
    )
    if gamma is not None:
        plan.warnings.append(
            "TCDScheduler samples with TCD's timestep rule (t_s = floor((1 - gamma) t_prev), output at t_s = 0), not "
            "diffdistill's sigma-space tcd_sample; the export reproduces the scheduler's rule "
            "(diffdistill.export.sd.tcd_scheduler_sample)"
        )
    if getattr(generator, "input_noise", "prior") == "sigma":
        s0 = float(sigmas[0])
        plan.latents_scale = s0 / math.sqrt(1.0 + s0**2)  # x_vp = alpha sigma z = sqrt(1 - abar_t0) z
        plan.warnings.append(
            f"the student starts from sigma_init z (student.input_noise=sigma): call the pipeline with latents = "
            f"{plan.latents_scale:.6g} * torch.randn(...) (x_vp = sqrt(1 - abar_{timesteps[0]}) z); without latents "
            "it is fed unit noise"
        )
    if boundary == "none" and gamma is None:
        c_skip = 0.25 / ((10.0 * min(timesteps)) ** 2 + 0.25)
        if c_skip > 1e-6:
            plan.warnings.append(
                f"LCMScheduler applies LCM's boundary scalings, c_skip = {c_skip:.2g} at t = {min(timesteps)}, to a "
                "student trained without them"
            )
    return plan


# ---------------------------------------------------------------------------------------------- building it
def _scheduler(plan: SDPlan, base_config: dict[str, Any], adapter: nn.Module, recipe: dict[str, Any]):
    from diffusers import LCMScheduler, TCDScheduler

    cls = TCDScheduler if plan.scheduler == "TCDScheduler" else LCMScheduler
    known = set(inspect.signature(cls.__init__).parameters)  # a DDPMScheduler config's variance_type etc. dropped
    cfg = {k: v for k, v in base_config.items() if k in known}
    over: dict[str, Any] = {
        "prediction_type": adapter.prediction_type,
        "clip_sample": False,  # diffdistill does not clamp x0
        "thresholding": False,
    }
    if plan.original_inference_steps is not None:
        over["original_inference_steps"] = plan.original_inference_steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = cls.from_config({**cfg, **over})
    ours = adapter.schedule.alphas_cumprod
    if sched.alphas_cumprod.shape != ours.shape or (sched.alphas_cumprod.double() - ours).abs().max() > 1e-6:
        # the student's own training schedule, as the betas that rebuild it
        betas = 1.0 - ours / torch.cat([ours.new_ones(1), ours[:-1]])
        sched = cls.from_config({**cfg, **over, "num_train_timesteps": len(ours), "trained_betas": betas.tolist()})
    sched.register_to_config(_diffdistill_recipe=recipe)
    return sched


def student_unet(generator: Generator) -> nn.Module:
    """A plain copy of the student's ``UNet2DConditionModel`` (LoRA adapters already merged or stripped)."""
    return plain_copy(sd_adapter(generator.denoiser).unet, "UNet")


def plain_copy(network: nn.Module, what: str) -> nn.Module:
    """A copy of the student's ``network`` (``what``: its name in the error) in eval mode; it must carry no LoRA
    layers (merge or strip them first)."""
    from diffdistill.models.lora import has_lora

    network = copy.deepcopy(network)
    if has_lora(network):
        raise ValueError(f"the student's {what} still carries LoRA layers: fuse or strip them first")
    return network.eval()


def check_unet(unet: nn.Module, base_unet_config: dict[str, Any]) -> None:
    """The student's UNet must fit the teacher pipeline's VAE and text encoders."""
    check_interface(dict(unet.config), base_unet_config, INTERFACE_KEYS, "UNet")


def check_interface(config: dict[str, Any], base_config: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    """The student's network config (``what``: its name in the error) agrees with the base pipeline's on ``keys``
    (the entries the base's VAE and text encoders fix; tuples and lists compare alike)."""
    diff = {k: (config.get(k), base_config.get(k)) for k in keys if _norm(config.get(k)) != _norm(base_config.get(k))}
    if diff:
        raise ValueError(
            f"the student's {what} does not fit the base pipeline (student vs base: {diff}); is base the teacher?"
        )


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def build_sd_pipeline(generator: Generator, plan: SDPlan, recipe: dict[str, Any], base_unet: bool = False):
    """The stock pipeline: the teacher pipeline's components, the student's UNet (``base_unet``: keep the base's,
    for a LoRA adapter export that has no other student weights) and the plan's scheduler."""
    import diffusers

    cls = getattr(diffusers, plan.pipeline_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = cls.from_pretrained(plan.base)
    adapter = sd_adapter(generator.denoiser)
    components = dict(base.components)
    if not base_unet:
        unet = student_unet(generator)
        check_unet(unet, dict(base.unet.config))
        components["unet"] = unet
    components["scheduler"] = _scheduler(plan, dict(base.scheduler.config), adapter, recipe)
    return cls(**components)


# ---------------------------------------------------------------------------------------------- LoRA
def write_sd_lora(generator: Generator, folder: Path, pipeline_class: str) -> list[str]:
    """Write the student's UNet LoRA in diffusers' layout (``pytorch_lora_weights.safetensors``, ``unet.``-prefixed
    peft keys plus the adapter's ``LoraConfig`` as metadata), which ``pipe.load_lora_weights(folder)`` reads
    (``StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))``).
    Returns the adapted module names (relative to the UNet)."""
    import diffusers

    from diffdistill.export.exporter import diffusers_lora_layers, lora_outside
    from diffdistill.models.lora import tuner_layers

    inside = tuner_layers(sd_adapter(generator.denoiser).unet)
    outside = lora_outside(generator.denoiser, inside)
    if outside:
        raise ValueError(
            f"LoRA adapters outside the UNet ({outside[:3]}...) cannot go into a UNet LoRA: export with lora=fuse"
        )
    state, meta = diffusers_lora_layers(inside)
    folder.mkdir(parents=True, exist_ok=True)
    getattr(diffusers, pipeline_class).save_lora_weights(
        str(folder), unet_lora_layers=state, unet_lora_adapter_metadata=meta, weight_name=LORA_WEIGHTS
    )
    return sorted(inside)


# ---------------------------------------------------------------------------------------------- the round trip
def pipeline_conditioning(pipe, prompts: list[str], plan: SDPlan, guidance: float | None) -> Conditioning:
    """The student's conditioning for ``prompts`` exactly as the pipeline builds its UNet inputs (its own
    ``encode_prompt``; SDXL's time ids ``(H, W, 0, 0, H, W)`` at the default resolution)."""
    device = torch.device("cpu")
    with torch.no_grad():
        if plan.kind == "sd":
            pe, _ = pipe.encode_prompt(prompts, device, 1, False)
            pooled = micro = None
        else:
            pe, _, pooled, _ = pipe.encode_prompt(
                prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            size = pipe.default_sample_size * pipe.vae_scale_factor
            micro = torch.tensor([[size, size, 0, 0, size, size]], dtype=pe.dtype).repeat(len(prompts), 1)
    w = None if guidance is None else torch.full((len(prompts),), float(guidance))
    return Conditioning(prompt_embeds=pe, pooled_prompt_embeds=pooled, micro_conds=micro, guidance_scale=w)


def reference_sd_sample(
    gen: Generator, cond: Conditioning, seed: int, sigmas: list[float], gamma: float | None = None
) -> Tensor:
    """diffdistill's own sampler under the pipelines' seeding: unit latents, then one noise draw per further step,
    all from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((cond.batch_size, *gen.sample_shape), generator=g)
    with torch.no_grad():
        return gen.sample(z, cond, sigmas, generator=g, gamma=gamma)


def tcd_scheduler_sample(
    gen: Generator, z: Tensor, cond: Conditioning, timesteps: list[int], gamma: float, generator: torch.Generator
) -> Tensor:
    """What ``TCDScheduler`` (diffusers ``scheduling_tcd.py``, ``step``) computes with the student, in the EDM view;
    returns VP latents, as the pipeline does. Per timestep ``t`` (next ``t'``, 0 after the last):
    ``x0 = D(x, sigma_t)``, ``eps = (x - x0) / sigma_t``; ``t_s = floor((1 - gamma) t')``; ``x_s = x0 + sigma_{t_s}
    eps`` (``pred_noised_sample``); before the last step ``x = x_s + sqrt(sigma_{t'}^2 - sigma_{t_s}^2) eps'`` with a
    fresh draw when ``gamma > 0``, else ``x = x_s``; the output is ``alpha_{t_s} x_s`` at the last ``t_s = 0``.
    TCD's intermediate point is a *timestep* fraction and its output keeps ``sigma_0 eps``: diffdistill's own
    ``tcd_sample`` (``sigma_s = (1 - gamma) sigma'``, output ``x0``) differs, so a TCD export reproduces this."""
    schedule = sd_adapter(gen.denoiser).schedule

    def sigma(t: int) -> Tensor:
        return schedule.sigmas[t].float().reshape(1).expand(z.shape[0]).to(z.device)

    x = gen.noise_input(z, sigma(timesteps[0]))
    for i, t in enumerate(timesteps):
        s = sigma(t)
        x0 = gen.denoise(x, s, cond)
        eps = (x - x0) / s[:, None, None, None]
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else 0
        t_s = int(math.floor((1 - gamma) * t_prev))
        s_s = sigma(t_s)[:, None, None, None]
        x = x0 + s_s * eps
        if gamma > 0 and i + 1 < len(timesteps):
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            x = x + (sigma(t_prev)[:, None, None, None] ** 2 - s_s**2).sqrt() * noise
    return x * schedule.alpha_sigma(s_s)[0]


def pipeline_sample(pipe, prompts: list[str], plan: SDPlan, steps: int, seed: int) -> Tensor:
    """The stock pipeline's latents for ``prompts`` (``output_type="latent"``), one seeded generator; with
    ``plan.latents_scale`` the unit latents are drawn from it first and passed scaled (``latents=``), so the
    scheduler's later draws follow them as in a plain call."""
    g = torch.Generator().manual_seed(seed)
    kw = plan.call_kwargs(steps)
    if plan.latents_scale is not None:
        size = pipe.unet.config.sample_size
        shape = (len(prompts), pipe.unet.config.in_channels, size, size)
        kw["latents"] = plan.latents_scale * torch.randn(shape, generator=g)
    with torch.no_grad():
        return pipe(prompt=list(prompts), generator=g, output_type="latent", **kw).images


def verify_sd(folder: Path, plan: SDPlan, ref: Generator, lora: Path | None, atol: float) -> dict[str, float]:
    """Load the written folder as a user would and compare it with diffdistill's sampler (max |difference|)."""
    import diffusers

    from diffdistill.export.exporter import check_close, quiet_diffusers

    cls = getattr(diffusers, plan.pipeline_class)
    with quiet_diffusers():  # the scheduler's notes on custom timesteps
        pipe = cls.from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        embedded = pipe.unet.config.time_cond_proj_dim is not None
        cond = pipeline_conditioning(pipe, VERIFY_PROMPTS, plan, plan.guidance_scale if embedded else None)
        out = {}
        for name, n in {"one_step": 1, "recipe": len(plan.timesteps)}.items():
            if plan.gamma is None:
                want = reference_sd_sample(ref, cond, 0, ref.sampling_sigmas[:n])
            else:
                g = torch.Generator().manual_seed(0)
                z = torch.randn((cond.batch_size, *ref.sample_shape), generator=g)
                with torch.no_grad():
                    want = tcd_scheduler_sample(ref, z, cond, plan.timesteps[:n], plan.gamma, g)
            got = pipeline_sample(pipe, VERIFY_PROMPTS, plan, n, 0)
            out[name] = check_close(got, want, atol, plan.pipeline_class, name)
    return out
