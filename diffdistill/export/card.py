"""The model card (``README.md`` with hub YAML front matter) of an exported pipeline."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

# evaluation-row keys that are bookkeeping, not metrics
_ROW_META = {"step", "ema", "sampler_steps", "checkpoint", "kind", "seconds", "mode_masses", "label"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class CardInfo:
    """What the card says: where the pipeline is, how it samples, and what the source recorded."""

    location: str
    pipeline_class: str
    reason: str
    sampling_sigmas: list[float]
    sigma_init: float
    gamma: float | None = None
    guidance: dict[str, float] | None = None
    guidance_embedded: bool = False
    num_classes: int | None = None
    sample_shape: list[int] = field(default_factory=list)
    stock_calls: dict[str, dict[str, Any]] | None = None
    lora: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    evals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    schedule_rho: float | None = None
    num_train_timesteps: int | None = None
    timesteps: list[int] | None = None  # SD-family exports: the recipe's discrete timesteps
    scheduler: str | None = None  # LCMScheduler | TCDScheduler (SD family) | FlowMatchEulerDiscreteScheduler
    flow_times: list[float] | None = None  # flow (SD3) exports: u = sigma / (1 + sigma) of the recipe
    flow_shift: float | None = None  # flow exports: the scheduler's time shift s (sigma -> s sigma)
    load_kwargs: dict[str, Any] | None = None  # flow exports: from_pretrained keywords (text_encoder_3=None, ...)
    latents_scale: float | None = None  # SD exports of input_noise="sigma" students: latents = scale * unit noise

    @property
    def is_text_to_image(self) -> bool:
        return self.pipeline_class.startswith("StableDiffusion")

    @property
    def is_flow(self) -> bool:
        return self.flow_times is not None

    @property
    def is_image(self) -> bool:
        return len(self.sample_shape) == 3


def base_model(teacher: Any) -> str | None:
    """The teacher as a hub ``base_model`` when it is a hub repository id (not a local path or a class name)."""
    if not isinstance(teacher, str) or not _HUB_ID.match(teacher) or os.path.exists(teacher):
        return None
    return teacher


def _front_matter(info: CardInfo) -> str:
    meta = info.metadata
    tags = ["diffdistill", "distillation"]
    if meta.get("objective"):
        tags.append(str(meta["objective"]))
    tags.append("one-step")
    if len(info.sampling_sigmas) > 1:
        tags.append("few-step")
    if info.num_classes is not None:
        tags.append("class-conditional")
    if info.lora == "adapters":
        tags.append("lora")
    if info.is_text_to_image:
        tags.append(info.scheduler or "LCMScheduler")
    lines = ["---", "library_name: diffusers"]
    if info.is_text_to_image:
        lines.append("pipeline_tag: text-to-image")
    elif info.is_image:
        lines.append("pipeline_tag: unconditional-image-generation")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags]
    bm = base_model(meta.get("teacher"))
    if bm:
        lines.append(f"base_model: {bm}")
    lines.append("---")
    return "\n".join(lines)


def _kwargs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in d.items())


def _flow_snippet(info: CardInfo) -> str:
    loc, cls = json.dumps(info.location), info.pipeline_class
    calls = info.stock_calls or {}
    load = "".join(f", {k}={v!r}" for k, v in (info.load_kwargs or {}).items())
    lines = ["import torch", f"from diffusers import {cls}", "", f"pipe = {cls}.from_pretrained({loc}{load})"]
    if info.lora == "adapters":
        lines.append(f'pipe.load_lora_weights({loc}, subfolder="lora")  # the distilled LoRA (pipe.fuse_lora() merges)')
    prompt = json.dumps("a photo of a cat")
    lines.append(
        f"image = pipe({prompt}, {_kwargs(calls.get('one', {}))}, generator=torch.Generator().manual_seed(0))"
        ".images[0]  # one step"
    )
    if len(info.sampling_sigmas) > 1:
        lines.append("torch.manual_seed(1)  # the re-noising's global generator: not the latents' seed (same stream)")
        lines.append(
            f"image = pipe({prompt}, {_kwargs(calls.get('all', {}))}, generator=torch.Generator().manual_seed(0))"
            ".images[0]  # the recipe"
        )
    return "\n".join(lines)


def _sd_snippet(info: CardInfo) -> str:
    loc, cls = json.dumps(info.location), info.pipeline_class
    calls = info.stock_calls or {}
    lines = ["import torch", f"from diffusers import {cls}", "", f"pipe = {cls}.from_pretrained({loc})"]
    if info.lora == "adapters":
        lines.append(f'pipe.load_lora_weights({loc}, subfolder="lora")  # the distilled LoRA (pipe.fuse_lora() merges)')
    prompt = json.dumps("a photo of a cat")
    gen, latents = "generator=torch.Generator().manual_seed(0)", ""
    if info.latents_scale is not None:
        # the student starts from sigma_init z (student.input_noise=sigma); a call without latents feeds it unit noise
        shape = tuple([1, *info.sample_shape])
        lines += [
            "g = torch.Generator().manual_seed(0)",
            f"latents = {info.latents_scale:.8g} * torch.randn({shape}, generator=g)  # the student's input noise",
        ]
        gen, latents = "generator=g", "latents=latents, "
    lines.append(f"image = pipe({prompt}, {latents}{_kwargs(calls.get('one', {}))}, {gen}).images[0]  # one step")
    if len(info.sampling_sigmas) > 1:
        if info.latents_scale is not None:
            lines += [
                "g = torch.Generator().manual_seed(0)",
                f"latents = {info.latents_scale:.8g} * torch.randn({shape}, generator=g)",
            ]
        lines.append(f"image = pipe({prompt}, {latents}{_kwargs(calls.get('all', {}))}, {gen}).images[0]  # the recipe")
    return "\n".join(lines)


def snippet(info: CardInfo) -> str:
    """The Python that loads the pipeline and samples it (one step, then the recipe)."""
    if info.is_flow:
        return _flow_snippet(info)
    if info.is_text_to_image:
        return _sd_snippet(info)
    loc = info.location
    n = 4
    labels = "" if info.num_classes is None else f"class_labels={[i % info.num_classes for i in range(n)]}, "
    out = "" if info.is_image else ', output_type="pt"'
    lines = ["import torch"]
    if info.pipeline_class == "ConsistencyModelPipeline":
        lines += ["from diffusers import ConsistencyModelPipeline", ""]
        lines.append(f"pipe = ConsistencyModelPipeline.from_pretrained({json.dumps(loc)})")
        if info.lora == "adapters":
            lines.insert(2, "from peft import PeftModel")
            adapter = f'PeftModel.from_pretrained(pipe.unet, {json.dumps(loc)}, subfolder="lora")'
            lines.append(f"pipe.unet = {adapter}.merge_and_unload()")
        calls = info.stock_calls or {"one": {"num_inference_steps": 1}, "all": {"num_inference_steps": 1}}
        lines.append(
            f"images = pipe(batch_size={n}, {labels}{_kwargs(calls['one'])}, "
            f"generator=torch.Generator().manual_seed(0)).images  # one step"
        )
        if len(info.sampling_sigmas) > 1:
            lines.append(
                f"images = pipe(batch_size={n}, {labels}{_kwargs(calls['all'])}, "
                f"generator=torch.Generator().manual_seed(0)).images  # sigmas {info.sampling_sigmas}"
            )
    else:
        lines += ["from diffdistill.export import DiffDistillPipeline", ""]
        lines.append(f"pipe = DiffDistillPipeline.from_pretrained({json.dumps(loc)})")
        if info.lora == "adapters":
            lines.append(f'pipe.load_lora({json.dumps(loc)}, subfolder="lora")')
        lines.append(
            f"images = pipe(batch_size={n}, {labels}num_inference_steps=1, "
            f"generator=torch.Generator().manual_seed(0){out}).images  # one step"
        )
        if len(info.sampling_sigmas) > 1:
            lines.append(
                f"images = pipe(batch_size={n}, {labels}generator=torch.Generator().manual_seed(0){out}).images"
                f"  # the recipe: sigmas {info.sampling_sigmas}"
            )
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "-"
    return str(v)


def _protocol_line(p: dict[str, Any]) -> str:
    parts = []
    for k, v in p.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
            if len(v) > 120:
                v = v[:117] + "..."
        parts.append(f"`{k}`: {v}")
    return "; ".join(parts)


def _metrics(info: CardInfo) -> list[str]:
    lines: list[str] = []
    step, ema = info.metadata.get("step"), info.metadata.get("ema_decay")
    for name, doc in info.evals:
        rows = [r for r in doc.get("results", []) if isinstance(r, dict)]
        mine = [r for r in rows if r.get("step") == step and _same_ema(r.get("ema"), ema)]
        shown = (mine or rows)[-20:]
        cols = []
        for r in shown:
            cols += [k for k, v in r.items() if k not in _ROW_META and isinstance(v, (int, float)) and k not in cols]
        lines += ["", f"**`eval/{name}`**" + (" (rows of this export's step and EMA track)" if mine else "")]
        if doc.get("protocol"):
            lines += ["", "Protocol: " + _protocol_line(doc["protocol"])]
        if shown and cols:
            head = ["step", "ema", "sampler steps", *cols]
            lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for r in shown:
                vals = [r.get("step"), r.get("ema"), r.get("sampler_steps"), *(r.get(c) for c in cols)]
                lines.append("| " + " | ".join(_fmt(v) for v in vals) + " |")
    recorded = info.metadata.get("metrics")
    if isinstance(recorded, dict) and recorded:
        lines += ["", "Recorded with the model: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in recorded.items())]
    return lines


def _same_ema(a: Any, b: Any) -> bool:
    try:
        return (a is None and b is None) or float(a) == float(b)
    except (TypeError, ValueError):
        return False


def model_card(info: CardInfo) -> str:
    """The ``README.md`` of the export folder."""
    meta = info.metadata
    paper = meta.get("paper") if isinstance(meta.get("paper"), dict) else {}
    objective = meta.get("objective") or "unknown"
    title = f"diffdistill student ({objective})"
    lines = [_front_matter(info), "", f"# {title}", ""]
    lines.append(
        f"A {'one-step' if len(info.sampling_sigmas) == 1 else 'one-step / few-step'} generator distilled with "
        "diffdistill from a diffusion teacher, exported as a diffusers pipeline."
    )
    lines += ["", "## Training", ""]
    if paper.get("title"):
        arxiv = paper.get("arxiv")
        link = f" ([arXiv:{arxiv}](https://arxiv.org/abs/{arxiv}))" if arxiv else ""
        lines.append(f"- Objective: `{objective}`, *{paper['title']}*{link}")
    else:
        lines.append(f"- Objective: `{objective}`")
    facts = [
        ("Teacher", meta.get("teacher")),
        ("Training iterations", meta.get("step")),
        ("Batch size", meta.get("batch_size")),
        (
            "Training time",
            f"{meta['train_seconds']:.0f} s" if isinstance(meta.get("train_seconds"), (int, float)) else None,
        ),
        ("Weights", "EMA, decay " + _fmt(meta["ema_decay"]) if meta.get("ema_decay") is not None else "online"),
        ("Run", meta.get("run_name")),
    ]
    lines += [f"- {k}: {v}" for k, v in facts if v is not None]
    lines += ["", "## Sampling recipe", ""]
    lines.append(f"- Pipeline: `{info.pipeline_class}` ({info.reason}).")
    if info.is_flow:
        lines += _flow_recipe(info)
    elif info.is_text_to_image:
        lines += _sd_recipe(info)
    elif info.pipeline_class == "ConsistencyModelPipeline":
        noise = "the unit latents, then one noise tensor per step"
    else:
        noise = "the unit latents, then (only when no class labels are given) random labels, then one noise tensor per "
        noise += "further step"
    if not info.is_text_to_image:
        lines += _pixel_recipe(info, noise)
    lines += _common_recipe(info)
    lines += ["", "## Usage", "", "```python", snippet(info), "```"]
    metric_lines = _metrics(info)
    if metric_lines:
        lines += ["", "## Metrics", *metric_lines]
    return "\n".join(lines) + "\n"


def _sd_recipe(info: CardInfo) -> list[str]:
    sched = info.scheduler or "LCMScheduler"
    lines = [
        f"- Scheduler: `{sched}`; timesteps `{info.timesteps}` (EDM sigmas `{info.sampling_sigmas}`); pass them as "
        "`timesteps=` (also recorded in `diffdistill.json` and `scheduler/scheduler_config.json`, "
        "`_diffdistill_recipe`).",
        "- Noise: the pipeline draws from `generator`, in order, the unit latents, then one noise tensor per further "
        "step (the scheduler's re-noising); diffdistill's sampler draws the same.",
    ]
    if info.gamma is not None:
        lines.append(f"- TCD: `eta = gamma = {info.gamma:g}`.")
    if not info.guidance_embedded:
        lines.append("- No classifier-free guidance at sampling time (`guidance_scale <= 1`): it was distilled in.")
    return lines


def _flow_recipe(info: CardInfo) -> list[str]:
    calls = info.stock_calls or {}
    u = [round(v, 6) for v in info.flow_times or []]
    lines = [
        f"- Scheduler: `{info.scheduler}` with `stochastic_sampling=True`: each step predicts `x0 = x_t - u v` and "
        "re-noises to the next flow time with fresh noise, `x_t' = (1 - u') x0 + u' eps`, as diffdistill's few-step "
        f"sampler does. Flow times `u = {u}` (EDM sigmas `{info.sampling_sigmas}`, `u = sigma / (1 + sigma)`).",
        f"- Pass `sigmas={calls.get('all', {}).get('sigmas')}`: the flow times *before* the scheduler's time shift "
        f"(s = {info.flow_shift:g}, `u = s u0 / (1 + (s - 1) u0)`), which give these `u` exactly (also recorded in "
        "`diffdistill.json` and `scheduler/scheduler_config.json`, `_diffdistill_recipe`); the first `n` of them "
        "sample `n` steps.",
        "- Noise: the pipeline draws the unit latents from `generator`; the scheduler's re-noising draws one tensor "
        "per step from torch's *global* generator (`StableDiffusion3Pipeline` calls `scheduler.step` without "
        "`generator`), so seed it with `torch.manual_seed` for reproducible few-step samples, with a seed other "
        "than the generator's (generators seeded alike draw the same stream: the first step's noise would repeat "
        "the latents).",
        "- No classifier-free guidance at sampling time: pass `guidance_scale=1.0` (the pipeline's default is 7).",
    ]
    if info.load_kwargs:
        lines.append(
            f"- This pipeline has no T5 text encoder: load it with {_kwargs(info.load_kwargs)} (T5's place is zeros)."
        )
    return lines


def _pixel_recipe(info: CardInfo, noise: str) -> list[str]:
    lines = [f"- Noise: the pipeline draws from `generator`, in order, {noise}."]
    lines.append(f"- One step: input noise `sigma_init = {info.sigma_init:g}` times unit Gaussian noise.")
    if len(info.sampling_sigmas) > 1:
        kind = f"TCD gamma sampling, gamma = {info.gamma:g}" if info.gamma is not None else "consistency multistep"
        lines.append(f"- Few steps ({kind}): sigmas `{info.sampling_sigmas}`.")
    if info.num_train_timesteps is not None and len(info.sampling_sigmas) > 1:
        lines.append(
            f"- Scheduler grid: {info.num_train_timesteps} Karras points, rho = {info.schedule_rho:.6g}, chosen so "
            "that the recipe's sigmas are grid points (the recipe is recorded in `scheduler/scheduler_config.json`, "
            "`_diffdistill_recipe`)."
        )
    return lines


def _common_recipe(info: CardInfo) -> list[str]:
    lines: list[str] = []
    if info.guidance_embedded or info.guidance:
        g = info.guidance or {}
        omega = ""
        if info.is_text_to_image:
            omega = " (the UNet embeds `guidance_scale - 1`, LCM's omega, as diffusers' SD pipelines do)"
        lines.append(
            f"- Guidance-embedded: `guidance_scale` in [{_fmt(g.get('w_min'))}, {_fmt(g.get('w_max'))}], "
            f"default {_fmt(g.get('w_default'))}{omega}."
        )
    if info.num_classes is not None:
        line = f"- Class-conditional: {info.num_classes} classes; labels drawn at random are real classes"
        if info.pipeline_class == "ConsistencyModelPipeline":  # its random labels come from torch's global RNG
            line += " (the null class of classifier-free guidance is not exported); pass `class_labels` to reproduce"
        lines.append(line + ".")
    if info.lora == "adapters":
        fmt = "a diffusers LoRA (`pipe.load_lora_weights`)" if info.is_text_to_image else "the peft adapter"
        lines.append(
            f"- LoRA: the pipeline folder holds the *base* network; the distilled student is the base plus {fmt} in "
            "`lora/` (applied in the snippet below)."
        )
    elif info.lora == "fuse":
        lines.append("- LoRA: the adapters are merged into the weights (a plain network).")
    return lines
