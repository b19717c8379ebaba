"""Flow-matching (SD3) students as stock ``StableDiffusion3Pipeline`` folders.

A student whose denoiser is a :class:`~diffdistill.models.adapters.flow.DiffusersFlowDenoiser` (full or LoRA; a plain
student such as DMD's, SiD's, DMD2's, LADD's or sCM/rCM's, whose few-step sampler is "denoise, re-noise to the next
sigma with fresh noise") is the teacher's pipeline with the student's transformer and the teacher's
``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling=True``, called with the recipe's ``sigmas=``. Why that
is exact, in the EDM view ``x = x_rf / (1 - u)``, ``sigma = u / (1 - u)``:

* the pipeline starts from unit latents ``x_rf = z``; diffdistill's ``Generator.sample`` starts from
  ``prior_std(sigma) z = (1 + sigma) z``, whose ``x_rf = (1 - u)(1 + sigma) z = z``;
* ``FlowMatchEulerDiscreteScheduler.step`` with ``stochastic_sampling`` (diffusers
  ``scheduling_flow_match_euler_discrete.py``) computes ``x0 = x_rf - u v`` (the adapter's ``flow_to_x0``) and
  ``x_rf' = (1 - u') x0 + u' eps`` with a fresh ``eps``: in the EDM view ``x' = x0 + sigma' eps``, diffdistill's
  multistep sampler; at the last step ``u' = 0`` returns ``x0``;
* ``pipe(sigmas=...)`` takes flow times *before* the scheduler's shift ``u -> s u / (1 + (s-1) u)`` (SD3: ``s = 3``),
  which in the EDM view is ``sigma -> s sigma``; the export hands it ``u(sigma / s)``
  (:meth:`~diffdistill.models.adapters.flow.DiffusersFlowDenoiser.pipeline_sigmas`), and a dynamic shift's ``mu``.

The re-noising draws come from torch's *global* generator: ``StableDiffusion3Pipeline.__call__`` calls
``scheduler.step`` without its ``generator`` (which seeds only the latents). A seeded few-step call is
``torch.manual_seed(s + 1); pipe(..., generator=torch.Generator().manual_seed(s))``: the two seeds must differ, since
generators seeded alike draw the same stream and the first step's "fresh" noise would then *be* the latents. The
export's check and the tests seed diffdistill's sampler the same way (:func:`reference_flow_sample`).

Not expressible, with one clear error each: a boundary-condition consistency student on flow (Song et al.'s
``c_skip x + c_out D``, which no stock flow scheduler applies), TCD gamma sampling, guidance-embedded students (SD3's
transformer has no guidance input), Flux-shaped students. The recipe (EDM sigmas, flow times, the ``sigmas=`` of the
call) is written into ``diffdistill.json``, the scheduler config (``_diffdistill_recipe``) and the model card.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffdistill.models.conditioning import Conditioning
from diffdistill.models.generator import Generator

FLOW_PIPELINE = "StableDiffusion3Pipeline"
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
T5_PARTS = ("text_encoder_3", "tokenizer_3")  # optional in SD3: absent ones must be passed as None to load
# transformer config entries the teacher pipeline's VAE / text encoders fix (the student may differ elsewhere)
INTERFACE_KEYS = (
    "in_channels",
    "out_channels",
    "patch_size",
    "sample_size",
    "joint_attention_dim",
    "pooled_projection_dim",
)
# scheduler options that remap the sigmas handed to it: off in the export, whose sigmas= are the exact levels
REMAPS = {
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
}
VERIFY_PROMPTS = ["lower newer", "wider"]


# ---------------------------------------------------------------------------------------------- recognising
def flow_adapter(denoiser: nn.Module) -> nn.Module | None:
    """The ``DiffusersFlowDenoiser`` at the root of ``denoiser`` or inside its wrappers (``inner``); ``None`` for
    other students."""
    from diffdistill.models.adapters.flow import DiffusersFlowDenoiser

    m, seen = denoiser, 0
    while m is not None and seen < 8:
        if isinstance(m, DiffusersFlowDenoiser):
            return m
        m, seen = getattr(m, "inner", None), seen + 1
    return None


def is_flow_student(generator: nn.Module) -> bool:
    return isinstance(generator, Generator) and flow_adapter(generator.denoiser) is not None


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class FlowPlan:
    """How the stock ``StableDiffusion3Pipeline`` reproduces the student: the base, the call and how to load."""

    base: str
    sigmas: list[float]  # the recipe's EDM sigmas
    pipeline_sigmas: list[float]  # pipe(sigmas=...): flow times before the scheduler's shift
    shift: float
    mu: float | None = None  # dynamic shifting: passed as pipe(mu=...)
    load_kwargs: dict[str, Any] = field(default_factory=dict)  # from_pretrained(..., text_encoder_3=None, ...)
    reason: str = ""
    warnings: list[str] = field(default_factory=list)

    pipeline_class = FLOW_PIPELINE
    scheduler = FLOW_SCHEDULER

    @property
    def flow_times(self) -> list[float]:
        """The flow times ``u = sigma / (1 + sigma)`` the transformer is run at (after the shift)."""
        return [s / (1 + s) for s in self.sigmas]

    def call_kwargs(self, steps: int | None = None) -> dict[str, Any]:
        """``pipe(prompt, **kwargs)`` for the first ``steps`` sigmas (default: the whole recipe); no CFG (the
        pipeline's default ``guidance_scale`` is 7)."""
        n = len(self.sigmas) if steps is None else steps
        kw: dict[str, Any] = {"sigmas": list(self.pipeline_sigmas[:n]), "guidance_scale": 1.0}
        if self.mu is not None:
            kw["mu"] = self.mu
        return kw


def base_class(base: str) -> str | None:
    from diffdistill.models.text import read_model_index

    return read_model_index(base).get("_class_name")


def flow_base(base: str | Path | None, metadata: dict[str, Any]) -> str:
    """The teacher's ``StableDiffusion3Pipeline`` folder (or hub id): ``base``, else the run's recorded teacher."""
    from diffdistill.export.sd import resolve_base

    path = resolve_base(base, metadata)
    cls = base_class(path)
    if cls != FLOW_PIPELINE:
        raise ValueError(f"base '{path}' is a {cls}; an SD3 transformer student needs a {FLOW_PIPELINE} folder")
    return path


def _load_kwargs(base: str) -> dict[str, Any]:
    """``text_encoder_3=None, tokenizer_3=None`` where the pipeline has no T5 (SD3 lists it as required)."""
    from diffdistill.models.text import read_model_index

    index = read_model_index(base)
    return {k: None for k in T5_PARTS if (index.get(k) or [None, None])[0] is None}


def _not_expressible(den: nn.Module, adapter: nn.Module) -> str | None:
    from diffdistill.models.adapters.flow import DiffusersFluxDenoiser
    from diffdistill.models.backbones import has_guidance_embedding
    from diffdistill.models.consistency import ConsistencyDenoiser

    if isinstance(adapter, DiffusersFluxDenoiser):
        return (
            "a Flux-shaped student (FluxTransformer2DModel) has no stock-pipeline export yet; sample it with "
            "diffdistill's Generator.sample on the model folder"
        )
    if isinstance(den, ConsistencyDenoiser):
        return (
            "this flow student has Song et al.'s boundary condition (ConsistencyDenoiser, x0 = c_skip x + c_out D), "
            "which no stock flow scheduler applies (FlowMatchEulerDiscreteScheduler takes the transformer's velocity "
            "as is): train it without the boundary (objective.boundary_condition=false for cd / ect / lcm), or use a "
            "plain flow student (dmd, dmd2, sid, ladd, scm / rcm), which exports as StableDiffusion3Pipeline"
        )
    if den is not adapter:
        return f"its denoiser wraps the flow transformer in a {type(den).__name__}, which no stock scheduler applies"
    if has_guidance_embedding(den):
        return "it is guidance-embedded and SD3's transformer has no guidance input"
    return None


def plan_flow(generator: Generator, base: str, gamma: float | None = None) -> FlowPlan:
    """Check that the stock ``StableDiffusion3Pipeline`` can express ``generator`` and return how."""
    den = generator.denoiser
    adapter = flow_adapter(den)
    if adapter is None:
        raise ValueError(f"{type(den).__name__} is not a flow-matching (DiffusersFlowDenoiser) student")
    why = _not_expressible(den, adapter)
    if why is None and gamma is not None:
        why = (
            f"its recipe samples with TCD gamma = {gamma:g}; FlowMatchEulerDiscreteScheduler re-noises with fresh "
            "noise only (gamma = 1): export without gamma"
        )
    if why is None and generator.guidance is not None:
        why = "it records a guidance range (guidance-embedded) and SD3's transformer has no guidance input"
    if why is not None:
        raise ValueError(f"the stock {FLOW_PIPELINE} cannot reproduce this student: {why}")
    sigmas = [float(s) for s in generator.sampling_sigmas]
    if any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sampling sigmas {sigmas} are not strictly decreasing (the scheduler steps down in u)")
    c = adapter.scheduler_config
    mu = adapter.mu() if c["use_dynamic_shifting"] else None
    s = adapter.shift(mu=mu) if mu is not None else adapter.shift()
    # (SD3 Eq. 23 in the EDM view: the shift is sigma -> s sigma) the call's flow times, before the shift
    pipeline_sigmas = [(x / s) / (1 + x / s) for x in sigmas]
    plan = FlowPlan(
        base=str(base),
        sigmas=sigmas,
        pipeline_sigmas=pipeline_sigmas,
        shift=float(s),
        mu=None if mu is None else float(mu),
        load_kwargs=_load_kwargs(base),
        reason=(
            f"the student is an SD3 flow transformer sampled by 'denoise, re-noise with fresh noise': the stock "
            f"{FLOW_PIPELINE} with {FLOW_SCHEDULER}(stochastic_sampling=True) and sigmas="
            f"{[round(u, 6) for u in pipeline_sigmas]} runs the same network on the same latents and noise"
        ),
    )
    if abs(generator.sigma_init - sigmas[0]) > 1e-6 * sigmas[0]:
        plan.warnings.append(
            f"student.sigma_init = {generator.sigma_init:g} differs from the first sampling sigma {sigmas[0]:g}: the "
            "export's one-step call (like Generator.sample) starts at the first sampling sigma"
        )
    remapped = [k for k in REMAPS if c.get(k) not in (None, False)]
    if remapped:
        plan.warnings.append(
            f"the teacher's scheduler remaps its sigmas ({', '.join(remapped)}); the export's scheduler does not, so "
            "that sigmas= gives the recipe's levels exactly"
        )
    return plan


# ---------------------------------------------------------------------------------------------- building it
def flow_scheduler(adapter: nn.Module, recipe: dict[str, Any]):
    """The student's ``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling`` and the recipe recorded."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = {k: v for k, v in adapter.scheduler_config.items() if not k.startswith("_")}
    sched = FlowMatchEulerDiscreteScheduler.from_config({**cfg, **REMAPS, "stochastic_sampling": True})
    sched.register_to_config(_diffdistill_recipe=recipe)
    return sched


def student_transformer(generator: Generator) -> nn.Module:
    """A plain copy of the student's ``SD3Transformer2DModel`` (LoRA adapters already merged or stripped)."""
    from diffdistill.export.sd import plain_copy

    return plain_copy(flow_adapter(generator.denoiser).transformer, "transformer")


def check_transformer(transformer: nn.Module, base_config: dict[str, Any]) -> None:
    """The student's transformer must fit the teacher pipeline's VAE and text encoders."""
    from diffdistill.export.sd import check_interface

    check_interface(dict(transformer.config), base_config, INTERFACE_KEYS, "transformer")


def load_flow_pipeline(path: str | Path, load_kwargs: dict[str, Any]):
    """``StableDiffusion3Pipeline.from_pretrained`` without progress bars and notes."""
    from diffusers import StableDiffusion3Pipeline

    from diffdistill.export.exporter import quiet_diffusers

    with quiet_diffusers(progress_bar=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusion3Pipeline.from_pretrained(str(path), **load_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flow_pipeline(generator: Generator, plan: FlowPlan, recipe: dict[str, Any]):
    """The teacher's pipeline with the student's transformer and the export's scheduler."""
    from diffusers import StableDiffusion3Pipeline

    base = load_flow_pipeline(plan.base, plan.load_kwargs)
    components = dict(base.components)
    transformer = student_transformer(generator)
    check_transformer(transformer, dict(base.transformer.config))
    components["transformer"] = transformer
    components["scheduler"] = flow_scheduler(flow_adapter(generator.denoiser), recipe)
    return StableDiffusion3Pipeline(**components)


def save_flow_pipeline(pipe, folder: Path) -> None:
    from diffdistill.export.exporter import quiet_diffusers, save_pipeline

    with quiet_diffusers():  # "text_encoder_3=None ... cannot be saved"
        save_pipeline(pipe, folder)


# ---------------------------------------------------------------------------------------------- LoRA
def write_flow_lora(generator: Generator, folder: Path) -> list[str]:
    """Write the student's transformer LoRA in diffusers' layout (``pytorch_lora_weights.safetensors``,
    ``transformer.``-prefixed peft keys plus the ``LoraConfig`` as metadata), which
    ``StableDiffusion3Pipeline.load_lora_weights(folder)`` reads (``SD3LoraLoaderMixin.save_lora_weights``).
    Returns the adapted module names (relative to the transformer)."""
    from diffusers import StableDiffusion3Pipeline

    from diffdistill.export.exporter import diffusers_lora_layers, lora_outside
    from diffdistill.models.lora import tuner_layers

    transformer = flow_adapter(generator.denoiser).transformer
    inside = tuner_layers(transformer)
    outside = lora_outside(generator.denoiser, inside)
    if outside:
        raise ValueError(
            f"LoRA adapters outside the transformer ({outside[:3]}...) cannot go into a transformer LoRA: "
            "export with lora=fuse"
        )
    state, meta = diffusers_lora_layers(inside)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(
        str(folder), transformer_lora_layers=state, transformer_lora_adapter_metadata=meta, weight_name=LORA_WEIGHTS
    )
    return sorted(inside)


# ---------------------------------------------------------------------------------------------- the round trip
def flow_conditioning(pipe, prompts: list[str]) -> Conditioning:
    """The student's conditioning for ``prompts`` exactly as the pipeline builds its transformer inputs (its own
    ``encode_prompt``: CLIP pair + T5, or zeros in T5's place)."""
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(
            list(prompts), prompt_2=None, prompt_3=None, device=torch.device("cpu"), do_classifier_free_guidance=False
        )
    return Conditioning(prompt_embeds=pe, pooled_prompt_embeds=pooled)


def noise_seed_of(seed: int) -> int:
    """The global generator's seed for the re-noising of a call whose latents use ``seed`` (a different stream)."""
    return seed + 1


def reference_flow_sample(gen: Generator, cond: Conditioning, seed: int, sigmas: list[float]) -> Tensor:
    """diffdistill's own sampler under the pipeline's seeding: unit latents from
    ``torch.Generator().manual_seed(seed)``, the re-noising from torch's global generator seeded with
    :func:`noise_seed_of` ``(seed)`` (its state restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((cond.batch_size, *gen.sample_shape), generator=g)
        torch.manual_seed(noise_seed_of(seed))
        with torch.no_grad():
            return gen.sample(z, cond, sigmas, generator=None)


def pipeline_flow_sample(pipe, prompts: list[str], plan: FlowPlan, steps: int, seed: int) -> Tensor:
    """The stock pipeline's latents (``output_type="latent"``) for the first ``steps`` sigmas, seeded like
    :func:`reference_flow_sample` (the global generator's state restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(noise_seed_of(seed))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return pipe(prompt=list(prompts), generator=g, output_type="latent", **plan.call_kwargs(steps)).images


def verify_flow(folder: Path, plan: FlowPlan, ref: Generator, lora: Path | None, atol: float) -> dict[str, float]:
    """Load the written folder as a user would and compare it with diffdistill's sampler (max |difference|)."""
    from diffdistill.export.exporter import check_close, quiet_diffusers

    pipe = load_flow_pipeline(folder, plan.load_kwargs)
    if lora is not None:
        with quiet_diffusers():  # "no LoRA keys associated to CLIPTextModelWithProjection"
            pipe.load_lora_weights(str(lora))
    cond = flow_conditioning(pipe, VERIFY_PROMPTS)
    out = {}
    for name, n in {"one_step": 1, "recipe": len(plan.sigmas)}.items():
        want = reference_flow_sample(ref, cond, 0, plan.sigmas[:n])
        got = pipeline_flow_sample(pipe, VERIFY_PROMPTS, plan, n, 0)
        out[name] = check_close(got, want, atol, FLOW_PIPELINE, name)
    return out


# ---------------------------------------------------------------------------------------------- export
def export_flow(
    generator: Generator,
    out: Path,
    meta: dict[str, Any],
    gamma: float | None,
    pipeline: str,
    lora: str,
    eval_results: list[Path] | None,
    source: str | None,
    repo_id: str | None,
    verify: bool,
    base: str | Path | None,
):
    """A flow (SD3) student as the stock ``StableDiffusion3Pipeline`` (see the module docstring); the arguments are
    :func:`~diffdistill.export.exporter.export_pipeline`'s. Returns its ``ExportResult``."""
    from diffdistill.export.exporter import (
        VERIFY_ATOL,
        apply_lora,
        finish_into_base,
        staged_folder,
        start_into_base,
    )

    if pipeline == "diffdistill":
        raise ValueError(f"DiffDistillPipeline takes no prompts: a flow (SD3) student exports as {FLOW_PIPELINE}")
    gen, ref, plan, lora_used = start_into_base(generator, verify, lambda g: plan_flow(g, flow_base(base, meta), gamma))
    with staged_folder(out) as tmp:
        adapter_dir = apply_lora(gen, lora, tmp, lambda folder: write_flow_lora(gen, folder))
        recipe = {
            "sigma_init": gen.sigma_init,
            "sampling_sigmas": list(plan.sigmas),
            "flow_times": plan.flow_times,
            "pipeline_sigmas": list(plan.pipeline_sigmas),
            "shift": plan.shift,
            "mu": plan.mu,
            "guidance_scale": 1.0,
            "scheduler": FLOW_SCHEDULER,
            "stochastic_sampling": True,
            "renoise_rng": "torch global generator (StableDiffusion3Pipeline calls scheduler.step without generator)",
            "load_kwargs": plan.load_kwargs,
            "call": plan.call_kwargs(),
        }
        save_flow_pipeline(build_flow_pipeline(gen, plan, recipe), tmp)
        result = finish_into_base(
            tmp,
            gen,
            out,
            plan,
            recipe,
            verify=(lambda: verify_flow(tmp, plan, ref, adapter_dir, VERIFY_ATOL)) if verify else None,
            eval_results=eval_results,
            source=source,
            repo_id=repo_id,
            lora=lora if lora_used else None,
            adapter_dir=adapter_dir,
            metadata=meta,
            sampling_sigmas=list(plan.sigmas),
            scheduler=FLOW_SCHEDULER,
            flow_times=plan.flow_times,
            flow_shift=plan.shift,
            load_kwargs=plan.load_kwargs,
        )
    return result
