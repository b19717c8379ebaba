"""Write a trained student as a diffusers pipeline folder (``diffdistill-export``).

Which pipeline (:func:`choose_pipeline`):

* a boundary-condition consistency student (``ConsistencyDenoiser`` over an ``EDMDenoiser`` whose backbone is a
  diffusers ``UNet2DModel`` fed ``1000 ln(sigma) / 4``, no guidance embedding, no TCD gamma): the stock
  ``ConsistencyModelPipeline`` + ``CMStochasticIterativeScheduler``, whose ``c_skip``/``c_out``
  (``get_scalings_for_boundary_condition``, Song et al. 2023, arXiv:2303.01469 App. C), input scaling
  ``1/sqrt(sigma^2 + sigma_d^2)`` and timestep ``1000 * 0.25 ln(sigma)`` are this student's, provided its few-step
  sigma list is a point set of a Karras grid the scheduler builds (:func:`cm_schedule`) and lies far enough above
  ``sigma_min`` that the scheduler's re-noising (Alg. 1) matches diffdistill's sampler. The exported UNet drops the
  null-class embedding row, so the stock pipeline's random labels are real classes;
* an SD-family student (a ``DiffusersSDDenoiser``, possibly inside LCM's boundary wrapper, possibly with LoRA): the
  teacher's stock ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` with the student's UNet and an
  ``LCMScheduler`` (``TCDScheduler`` for TCD sampling) plus the recipe's timesteps (:mod:`diffdistill.export.sd`);
  LoRA students as the base network plus a ``load_lora_weights`` folder ``lora/``, or fused;
* a flow-matching (SD3) student (a ``DiffusersFlowDenoiser``, possibly with LoRA): the teacher's stock
  ``StableDiffusion3Pipeline`` with the student's transformer and ``FlowMatchEulerDiscreteScheduler`` with
  ``stochastic_sampling`` plus the recipe's ``sigmas`` (:mod:`diffdistill.export.flow`);
* anything else (plain EDM students such as DMD's, guidance-embedded students, TCD sampling, MLP backbones):
  :class:`~diffdistill.export.pipeline.DiffDistillPipeline`.

The folder is written into a temporary folder beside the target, loaded back and compared with diffdistill's own
sampler, then renamed into place.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffdistill.export.card import CardInfo, model_card
from diffdistill.export.pipeline import DiffDistillGeneratorModel, DiffDistillPipeline, backbone_of
from diffdistill.models.backbones import has_guidance_embedding
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.generator import Generator
from diffdistill.models.lora import tuner_layers

log = logging.getLogger("diffdistill")

LORA_FOLDER = "lora"  # <export>/lora: adapter_config.json + adapter_model.safetensors (peft layout)
META_NAME = "diffdistill.json"
EXPORT_FORMAT = "diffdistill-export/1"
VERIFY_ATOL = 1e-3  # built-in round-trip check (data scale [-1, 1]); the tests hold the pipelines to 1e-5
LORA_MODES = ("fuse", "adapters")
PIPELINES = ("auto", "stock", "diffdistill")


# ---------------------------------------------------------------------------------------------- source metadata
def read_metadata(folder: str | Path) -> dict[str, Any]:
    """``diffdistill.json`` of a model folder as a dict (``{}`` when absent or unreadable; keys are optional)."""
    path = Path(folder) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def run_folder(source: str | Path) -> Path | None:
    """The training run a source lives in (the folder holding ``checkpoints/``), if any."""
    p = Path(source).resolve()
    for q in (p, *p.parents):
        ckpts = q / "checkpoints"
        if ckpts.is_dir() and (q == p or ckpts == p or ckpts in p.parents):
            return q
    return None


def eval_files(source: str | Path) -> list[Path]:
    """The run's recorded evaluation results, ``<run>/eval/*.json`` (``[]`` outside a run)."""
    run = run_folder(source)
    return sorted((run / "eval").glob("*.json")) if run is not None and (run / "eval").is_dir() else []


# ---------------------------------------------------------------------------------------------- which pipeline
@dataclass
class CMSchedule:
    """A ``CMStochasticIterativeScheduler`` setting whose sigmas are the recipe's, and the call that uses them."""

    num_train_timesteps: int
    rho: float
    timesteps: list[int]  # ``pipe(timesteps=...)``: descending grid indices; [0] = one step
    sigmas: list[float]

    def call_kwargs(self, steps: int | None = None) -> dict[str, Any]:
        """``pipe(**kwargs)`` for the first ``steps`` sigmas (default: all)."""
        n = len(self.sigmas) if steps is None else steps
        if n == 1:
            return {"num_inference_steps": 1}
        return {"num_inference_steps": None, "timesteps": sorted(self.timesteps)[:n][::-1]}


def _karras(ramp: float, sigma_min: float, sigma_max: float, rho: float) -> float:
    """The scheduler's ``_convert_to_karras`` (EDM, Karras et al. 2022, Eq. 5) for one ramp value."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _ramp(sigma: float, sigma_min: float, sigma_max: float, rho: float) -> float:
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (sigma ** (1 / rho) - hi) / (lo - hi)


def _scheduler(n: int, rho: float, sigma_min: float, sigma_max: float, sigma_data: float):
    from diffusers import CMStochasticIterativeScheduler

    return CMStochasticIterativeScheduler(
        num_train_timesteps=n,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        sigma_data=sigma_data,
        rho=rho,
        clip_denoised=False,  # diffdistill's sampler does not clamp intermediate x0
    )


def _exact(sched, ks: list[int], sigmas: list[float]) -> bool:
    """Whether the scheduler, asked for grid indices ``ks``, uses exactly ``sigmas`` (float32, as it runs)."""
    try:
        sched.set_timesteps(timesteps=sorted(ks, reverse=True))
    except ValueError:
        return False
    want = torch.tensor(sigmas, dtype=torch.float32)
    got = sched.sigmas[:-1].to(torch.float32)
    return got.shape == want.shape and bool(torch.equal(got, want))


def cm_schedule(sigmas: list[float], sigma_min: float, sigma_data: float = 0.5) -> CMSchedule | None:
    """A Karras grid (``num_train_timesteps``, ``rho``) holding every sigma of ``sigmas`` exactly, or ``None``.

    ``sigmas[0]`` is the grid's ``sigma_max`` and ``sigma_min`` its last point. Grids with EDM's ``rho = 7`` are
    searched first; a two-sigma recipe off those grids gets the ``rho`` that makes its second sigma the point
    nearest to where it lies on the 40-point EDM grid (the scheduler's default size), found by bisection.
    """
    sigmas = [float(s) for s in sigmas]
    smax = sigmas[0]
    if len(sigmas) == 1:
        sched = _scheduler(40, 7.0, sigma_min, smax, sigma_data)
        return CMSchedule(40, 7.0, [0], sigmas) if _exact(sched, [0], sigmas) else None
    if any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] <= sigma_min:
        return None
    for n in range(2, 1001):
        ks = [0]
        for s in sigmas[1:]:
            r = _ramp(s, sigma_min, smax, 7.0) * (n - 1)
            if abs(r - round(r)) > 1e-6:
                break
            ks.append(round(r))
        else:
            if _exact(_scheduler(n, 7.0, sigma_min, smax, sigma_data), ks, sigmas):
                return CMSchedule(n, 7.0, sorted(ks, reverse=True), sigmas)
    if len(sigmas) != 2:
        return None
    n, s = 40, sigmas[1]
    k0 = round(_ramp(s, sigma_min, smax, 7.0) * (n - 1))
    for k in sorted(range(1, n - 1), key=lambda k: abs(k - k0)):
        rho = _solve_rho(s, sigma_min, smax, k / (n - 1))
        if rho is not None and _exact(_scheduler(n, rho, sigma_min, smax, sigma_data), [0, k], sigmas):
            return CMSchedule(n, rho, [k, 0], sigmas)
    return None


def _solve_rho(sigma: float, sigma_min: float, sigma_max: float, ramp: float) -> float | None:
    """The ``rho`` in ``[1, 1000]`` at which ``sigma`` sits at ``ramp`` of the Karras grid (bisection), if any."""
    f = lambda rho: _ramp(sigma, sigma_min, sigma_max, rho) - ramp  # noqa: E731
    lo, hi = 1.0, 1000.0
    if f(lo) * f(hi) > 0:
        return None
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(lo) * f(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass
class Plan:
    kind: str  # "stock" | "diffdistill"
    reason: str
    schedule: CMSchedule | None = None


def choose_pipeline(generator: Generator, gamma: float | None = None, pipeline: str = "auto") -> Plan:
    """The stock ``ConsistencyModelPipeline`` where it reproduces the student exactly, else diffdistill's."""
    from diffdistill.models.backbones import UNetBackbone
    from diffdistill.models.consistency import ConsistencyDenoiser
    from diffdistill.models.denoiser import EDMDenoiser

    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    den = generator.denoiser
    inner = getattr(den, "inner", None)
    net = getattr(inner, "net", None)
    why = None
    if not isinstance(den, ConsistencyDenoiser) or not isinstance(inner, EDMDenoiser):
        why = (
            "it is not a boundary-condition consistency model over EDM preconditioning, and the stock "
            "CMStochasticIterativeScheduler always applies the boundary scalings of Song et al. (2023, App. C)"
        )
    elif not isinstance(net, UNetBackbone):
        why = f"its backbone is a {type(net).__name__}, not a diffusers UNet2DModel"
    elif has_guidance_embedding(den) or generator.guidance is not None:
        why = "it is guidance-embedded and the stock pipeline has no guidance-scale input"
    elif net.c_noise_scale != 1000.0:
        why = f"its UNet timestep is {net.c_noise_scale:g} ln(sigma)/4, the scheduler's is 1000 ln(sigma)/4"
    elif gamma is not None:
        why = f"its recipe samples with TCD gamma = {gamma:g}, the stock scheduler with consistency multistep only"
    elif generator.sampling_sigmas[0] != generator.sigma_init:
        why = "its first sampling sigma differs from sigma_init (the scheduler starts every call at sigma_max)"
    schedule = None
    # (both the stock scheduler and diffdistill's multistep sampler re-noise a boundary-condition student to
    # sqrt(sigma^2 - sigma_min^2), Song et al. 2023 Alg. 1, so no recipe is excluded on that account)
    if why is None:
        schedule = cm_schedule(generator.sampling_sigmas, den.sigma_min, den.sigma_data)
        if schedule is None:
            why = f"its sigma list {generator.sampling_sigmas} is not a point set of a Karras grid the scheduler builds"
    if why is not None:
        if pipeline == "stock":
            raise ValueError(f"the stock ConsistencyModelPipeline cannot reproduce this student: {why}")
        return Plan("diffdistill", f"the stock ConsistencyModelPipeline cannot express this student: {why}")
    if pipeline == "diffdistill":
        return Plan("diffdistill", "asked for with pipeline=diffdistill")
    return Plan(
        "stock",
        "the student is a boundary-condition consistency model over an EDM-preconditioned UNet2DModel, exactly the "
        "parametrisation of diffusers' CMStochasticIterativeScheduler",
        schedule,
    )


# ---------------------------------------------------------------------------------------------- LoRA
def fuse_lora(module: nn.Module) -> nn.Module:
    """Merge every active LoRA adapter into its base layer and drop the adapters (peft's ``merge_and_unload``)."""
    for layer in tuner_layers(module).values():
        layer.merge()
    return _strip_unmerged(module)


def _strip_unmerged(module: nn.Module) -> nn.Module:
    """Replace adapted layers by their (unmerged) base layers and forget the recorded LoRA spec."""
    from diffdistill.models.lora import strip_lora

    strip_lora(module)
    for m in module.modules():
        m.__dict__.pop("lora_spec", None)
    return module


def lora_root(denoiser: nn.Module) -> nn.Module:
    """What an exported adapter is relative to: the diffusers UNet of a UNet student, else the denoiser."""
    unet = getattr(backbone_of(denoiser), "unet", None)
    return denoiser if unet is None else unet


def write_lora_adapter(denoiser: nn.Module, folder: Path) -> list[str]:
    """Write the denoiser's LoRA adapter in peft's layout (``adapter_config.json`` + ``adapter_model.safetensors``),
    relative to :func:`lora_root`; returns the adapted module names."""
    from peft import LoraConfig, get_peft_model

    root = lora_root(denoiser)
    inside = tuner_layers(root)
    outside = lora_outside(denoiser, inside)
    if outside:
        raise ValueError(
            f"LoRA adapters outside the {type(root).__name__} ({outside[:3]}...) cannot be written as one "
            "adapter: export with lora=fuse"
        )
    name, kwargs = lora_config_of(inside)
    cfg = LoraConfig(**kwargs)
    base = _strip_unmerged(copy.deepcopy(root))
    peft_model = get_peft_model(base, cfg)
    theirs = tuner_layers(peft_model.base_model.model)
    if set(theirs) != set(inside):
        raise ValueError("peft adapts other layers than the student's from the written target list")
    with torch.no_grad():
        for k, layer in inside.items():
            own = {n: p for n, p in layer.named_parameters() if f".{name}." in f".{n}."}
            dst = dict(theirs[k].named_parameters())
            for n, p in own.items():
                dst[n.replace(f".{name}.", ".default.")].copy_(p)
    peft_model.save_pretrained(str(folder))
    return sorted(inside)


def lora_config_of(inside: dict[str, nn.Module]) -> tuple[str, dict[str, Any]]:
    """The one active adapter's name and the ``LoraConfig`` keywords that rebuild it on the root the layer names
    ``inside`` are relative to (the common rank/alpha, others as patterns); an actionable error otherwise."""
    adapters = {tuple(layer.active_adapters) for layer in inside.values()}
    if len(adapters) != 1 or len(next(iter(adapters))) != 1:
        raise ValueError(f"expected one active LoRA adapter, found {sorted(adapters)}: export with lora=fuse")
    (name,) = next(iter(adapters))
    ranks = {k: int(m.r[name]) for k, m in inside.items()}
    alphas = {k: float(m.lora_alpha[name]) for k, m in inside.items()}
    rslora = {bool(getattr(m, "use_rslora", {}).get(name, False)) for m in inside.values()}
    if len(rslora) != 1:
        raise ValueError("mixed rsLoRA scalings cannot be written as one adapter: export with lora=fuse")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return name, {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(inside),
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "use_rslora": rslora.pop(),
    }


def lora_outside(denoiser: nn.Module, inside: dict[str, nn.Module]) -> list[str]:
    """The names (in ``denoiser``) of its LoRA layers that are not among ``inside`` (one network's layers)."""
    ids = {id(m) for m in inside.values()}
    return sorted(n for n, m in tuner_layers(denoiser).items() if id(m) not in ids)


def diffusers_lora_layers(inside: dict[str, nn.Module]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The one adapter of the layers ``inside`` as diffusers' ``save_lora_weights`` takes it: the state dict in
    ``get_peft_model_state_dict``'s layout (adapter name dropped: ``"<layer>.lora_A.weight"``,
    ``"<layer>.lora_B.weight"``) and the ``LoraConfig`` as adapter metadata."""
    from peft import LoraConfig

    name, cfg = lora_config_of(inside)
    state = {
        f"{k}.{n.replace(f'.{name}.', '.')}": p.detach().cpu().contiguous()
        for k, layer in inside.items()
        for n, p in layer.named_parameters()
        if f".{name}." in f".{n}." and n.startswith("lora_")
    }
    meta = LoraConfig(**cfg).to_dict()
    return state, {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}


# ---------------------------------------------------------------------------------------------- building the folder
def _stock_unet(net: nn.Module) -> nn.Module:
    """The UNet of a ``UNetBackbone`` for the stock pipeline: its null-class embedding row is dropped, so the
    pipeline's random labels (``randint(num_class_embeds)``) are real classes; real labels compute the same."""
    from diffusers import UNet2DModel

    unet = net.unet
    if net.num_classes is None or not net.null_class:
        return copy.deepcopy(unet)
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config["num_class_embeds"] = net.num_classes
    out = UNet2DModel(**config)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    state["class_embedding.weight"] = state["class_embedding.weight"][: net.num_classes]
    out.load_state_dict(state)
    return out


def _stock_pipeline(gen: Generator, schedule: CMSchedule, recipe: dict[str, Any]):
    from diffusers import ConsistencyModelPipeline

    den = gen.denoiser
    sched = _scheduler(schedule.num_train_timesteps, schedule.rho, den.sigma_min, gen.sigma_init, den.sigma_data)
    # diffusers keeps "_"-prefixed config entries silently (not init arguments): the recipe travels with the scheduler
    sched.register_to_config(_diffdistill_recipe=recipe)
    return ConsistencyModelPipeline(unet=_stock_unet(den.inner.net).eval(), scheduler=sched)


def _own_pipeline(gen: Generator, gamma: float | None) -> DiffDistillPipeline:
    from diffdistill.models.io import model_config

    net = backbone_of(gen.denoiser)
    model = DiffDistillGeneratorModel(
        denoiser_config=model_config(gen.denoiser),
        sigma_init=gen.sigma_init,
        sampling_sigmas=list(gen.sampling_sigmas),
        gamma=gamma,
        guidance=dict(gen.guidance) if gen.guidance else None,
        num_classes=gen.num_classes,
        null_class=bool(getattr(net, "null_class", True)),
        sample_shape=list(gen.sample_shape),
        input_noise=getattr(gen, "input_noise", "prior"),
    )
    model.generator.denoiser.load_state_dict(gen.denoiser.state_dict())
    return DiffDistillPipeline(student=model.eval())


# ---------------------------------------------------------------------------------------------- the round-trip check
def reference_sample(
    gen: Generator,
    batch_size: int,
    seed: int,
    sigmas: list[float],
    class_labels: list[int] | None = None,
    gamma: float | None = None,
    guidance_scale: float | None = None,
) -> Tensor:
    """diffdistill's own sampler under the pipelines' seeding convention: unit latents, then per-step noise, all
    from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((batch_size, *gen.sample_shape), generator=g)
    labels = None if class_labels is None else torch.tensor(class_labels, dtype=torch.long)
    w = None if guidance_scale is None else torch.full((batch_size,), float(guidance_scale))
    with torch.no_grad():
        return gen.sample(z, Conditioning(class_labels=labels, guidance_scale=w), sigmas, generator=g, gamma=gamma)


def _pipeline_sample(pipe, kind: str, sigmas: list[float], labels: list[int] | None, schedule, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "diffdistill":
        return pipe(batch_size=2, class_labels=labels, sigmas=sigmas, generator=g, output_type="latent").images
    raw: list[Tensor] = []
    kwargs = schedule.call_kwargs(len(sigmas))
    pipe(
        batch_size=2,
        class_labels=labels,
        generator=g,
        output_type="pt",
        callback=lambda i, t, x: raw.append(x),
        **kwargs,
    )
    return raw[-1]


def _verify(folder: Path, plan: Plan, ref: Generator, gamma: float | None, adapter: Path | None) -> dict[str, float]:
    """Load the written folder like a user would and compare it with ``ref`` (max |difference| per recipe)."""
    from diffusers import ConsistencyModelPipeline

    cls = ConsistencyModelPipeline if plan.kind == "stock" else DiffDistillPipeline
    with quiet_diffusers(notes=False, progress_bar=True):
        pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        if plan.kind == "stock":
            from peft import PeftModel

            pipe.unet = PeftModel.from_pretrained(pipe.unet, str(adapter)).merge_and_unload()
        else:
            pipe.load_lora(str(adapter))
    labels = None if ref.num_classes is None else [i % ref.num_classes for i in range(2)]
    out = {}
    for name, sigmas in {"one_step": ref.sampling_sigmas[:1], "recipe": ref.sampling_sigmas}.items():
        want = reference_sample(ref, 2, 0, sigmas, labels, gamma)
        got = _pipeline_sample(pipe, plan.kind, sigmas, labels, plan.schedule, 0)
        out[name] = check_close(got, want, VERIFY_ATOL, f"{plan.kind} pipeline", name)
    return out


def check_close(got: Tensor, want: Tensor, atol: float, what: str, name: str) -> float:
    """``max |got - want|``, or an error naming the exported ``what`` and the recipe ``name`` above ``atol``."""
    diff = float((got.float().cpu() - want.float().cpu()).abs().max())
    if not math.isfinite(diff) or diff > atol:
        raise ValueError(
            f"the exported {what} does not reproduce the student ({name}: max |difference| {diff:.3g} > {atol}); "
            "nothing was written"
        )
    return diff


@contextmanager
def quiet_diffusers(notes: bool = True, progress_bar: bool = False) -> Iterator[None]:
    """Silence diffusers' notes (verbosity ``error``) and/or its progress bars inside the block, restoring both."""
    from diffusers.utils import logging as diffusers_logging

    level, bar = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    if notes:
        diffusers_logging.set_verbosity_error()
    if progress_bar:
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if notes:
            diffusers_logging.set_verbosity(level)
        if progress_bar and bar:
            diffusers_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    path: Path
    kind: str
    reason: str
    pipeline_class: str
    call: dict[str, Any] = field(default_factory=dict)
    verified: dict[str, float] = field(default_factory=dict)


def check_target(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing file, or a non-empty folder unless ``overwrite``."""
    out = Path(out)
    if out.is_file() or out.is_symlink():
        raise FileExistsError(f"export target '{out}' is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"export folder '{out}' is not empty; pass overwrite=true to replace it")
    return out


def _publish(tmp: Path, out: Path) -> None:
    for p in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700: readable like any folder
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old"))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------- export steps
def working_copies(generator: Generator, verify: bool) -> tuple[Generator, Generator | None]:
    """The copy the export works on (CPU, eval) and, with ``verify``, what the written folder must reproduce (a
    second copy, LoRA still unmerged)."""
    gen = copy.deepcopy(generator).cpu().eval()
    return gen, (copy.deepcopy(gen) if verify else None)


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed into place when the block ends and removed if it raises."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        yield tmp
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def apply_lora(gen: Generator, lora: str, tmp: Path, write_adapter: Callable[[Path], Any]) -> Path | None:
    """A LoRA student's adapters: ``lora="adapters"`` writes them into ``<tmp>/lora`` (``write_adapter(folder)``)
    and strips them from ``gen``; ``"fuse"`` merges them. Returns the adapter folder (``None``: none written)."""
    from diffdistill.models.lora import has_lora

    if not has_lora(gen.denoiser):
        return None
    if lora == "adapters":
        folder = tmp / LORA_FOLDER
        write_adapter(folder)
        _strip_unmerged(gen.denoiser)
        return folder
    fuse_lora(gen.denoiser)
    return None


def save_pipeline(pipe, folder: Path) -> None:
    """``pipe.save_pretrained(folder)`` without diffusers' deprecation notes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe.save_pretrained(str(folder))


def card_info(gen: Generator, out: Path, repo_id: str | None, evals: list, **fields: Any) -> CardInfo:
    """The model card's facts: the student's recipe and where the folder lives, ``fields`` added or overriding."""
    common: dict[str, Any] = {
        "location": repo_id or str(out),
        "sampling_sigmas": list(gen.sampling_sigmas),
        "sigma_init": gen.sigma_init,
        "sample_shape": list(gen.sample_shape),
        "evals": evals,
    }
    return CardInfo(**{**common, **fields})


def write_card_and_record(
    tmp: Path,
    info: CardInfo,
    *,
    source: str | None,
    pipeline: str,
    recipe: dict[str, Any],
    adapter_dir: Path | None,
    verified: dict[str, float],
    metadata: dict[str, Any],
    base: str | None = None,
    lora_format: str | None = None,
) -> None:
    """Write ``README.md`` (the model card of ``info``) and ``diffdistill.json`` (what was exported and how;
    ``base`` and ``lora_format`` are recorded where given: the exports into a teacher's pipeline)."""
    from diffdistill import __version__

    (tmp / "README.md").write_text(model_card(info))
    record: dict[str, Any] = {"format": EXPORT_FORMAT, "diffdistill_version": __version__, "source": source}
    if base is not None:
        record["base"] = base
    record |= {
        "pipeline": pipeline,
        "pipeline_class": info.pipeline_class,
        "reason": info.reason,
        "recipe": recipe,
        "lora": info.lora,
        "lora_folder": LORA_FOLDER if adapter_dir is not None else None,
    }
    if lora_format is not None:
        record["lora_format"] = lora_format if adapter_dir is not None else None
    record |= {"verified_max_abs_diff": verified, "source_metadata": metadata}
    (tmp / META_NAME).write_text(json.dumps(record, indent=2, default=str))


def start_into_base(generator: Generator, verify: bool, plan_of: Callable[[Generator], Any]):
    """The first steps of an export into the teacher's stock text-to-image pipeline: the working copies, the plan
    (``plan_of(gen)``, an ``SDPlan`` / ``FlowPlan``: its warnings logged) and whether the student has LoRA."""
    from diffdistill.models.lora import has_lora

    gen, ref = working_copies(generator, verify)
    plan = plan_of(gen)
    for w in plan.warnings:
        log.warning("export: %s", w)
    return gen, ref, plan, has_lora(gen.denoiser)


def finish_into_base(
    tmp: Path,
    gen: Generator,
    out: Path,
    plan: Any,
    recipe: dict[str, Any],
    *,
    verify: Callable[[], dict[str, float]] | None,
    eval_results: list[Path] | None,
    source: str | None,
    repo_id: str | None,
    lora: str | None,
    adapter_dir: Path | None,
    metadata: dict[str, Any],
    **card_fields: Any,
) -> ExportResult:
    """The last steps of an export into the teacher's stock pipeline, once its folder ``tmp`` holds the pipeline
    (``plan``: an ``SDPlan`` / ``FlowPlan``, with ``base``, ``reason``, ``pipeline_class`` and ``call_kwargs``): the
    evaluation files copied in, the check against diffdistill's sampler (``verify()``, ``None`` to skip), the card
    (``card_fields`` added), the record (``lora``: the LoRA mode of a LoRA student, else ``None``) and the result."""
    evals = _copy_evals(eval_results or [], tmp / "eval")
    verified = verify() if verify is not None else {}
    info = card_info(
        gen,
        out,
        repo_id,
        evals,
        pipeline_class=plan.pipeline_class,
        reason=plan.reason,
        stock_calls={"one": plan.call_kwargs(1), "all": plan.call_kwargs()},
        lora=lora,
        metadata={**metadata, "base": plan.base},
        **card_fields,
    )
    write_card_and_record(
        tmp,
        info,
        source=source,
        pipeline="stock",
        recipe=recipe,
        adapter_dir=adapter_dir,
        verified=verified,
        metadata=metadata,
        base=plan.base,
        lora_format="diffusers",
    )
    return ExportResult(out, "stock", plan.reason, plan.pipeline_class, plan.call_kwargs(), verified)


# ---------------------------------------------------------------------------------------------- export
def export_pipeline(
    generator: Generator,
    out: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
    gamma: float | None = None,
    pipeline: str = "auto",
    lora: str = "fuse",
    overwrite: bool = False,
    eval_results: list[Path] | None = None,
    source: str | None = None,
    repo_id: str | None = None,
    verify: bool = True,
    base: str | Path | None = None,
) -> ExportResult:
    """Write ``generator`` as a diffusers pipeline folder ``out`` (atomically) and return what was written.

    Args:
        generator: the student (left unchanged: the export works on a copy).
        metadata: the source model folder's ``diffdistill.json`` (for the model card; every key optional).
        gamma: TCD gamma of the recipe (default: ``metadata["gamma"]``); forces diffdistill's pipeline (SD-family
            students: ``TCDScheduler`` with ``eta = gamma``).
        pipeline: ``auto`` (stock where exact), ``stock`` (fail if not exact) or ``diffdistill``.
        lora: LoRA students: ``fuse`` (merge the adapters: a plain network) or ``adapters`` (the base network plus
            a peft adapter folder ``lora/``).
        eval_results: results JSON files to copy into ``eval/`` and summarise in the card.
        repo_id: the hub repository the folder will be pushed to (used in the card's snippet).
        verify: load the written folder back and compare it with diffdistill's sampler before publishing.
        base: SD-family and flow (SD3) students: the teacher's pipeline folder or hub id, whose VAE, text
            encoder(s) and tokenizer(s) the export carries (default: the teacher path recorded in ``metadata``); see
            :mod:`diffdistill.export.sd` and :mod:`diffdistill.export.flow`.
    """
    from diffdistill.export.flow import export_flow, is_flow_student
    from diffdistill.export.sd import is_sd_student
    from diffdistill.models.lora import has_lora

    if lora not in LORA_MODES:
        raise ValueError(f"lora must be one of {LORA_MODES}, got {lora!r}")
    if not isinstance(generator, Generator):
        raise ValueError(f"can only export a diffdistill Generator, got {type(generator).__name__}")
    out = check_target(out, overwrite)
    meta = dict(metadata or {})
    if gamma is None and meta.get("gamma") is not None:
        gamma = float(meta["gamma"])
    if is_sd_student(generator):
        return _export_sd(generator, out, meta, gamma, pipeline, lora, eval_results, source, repo_id, verify, base)
    if is_flow_student(generator):
        return export_flow(generator, out, meta, gamma, pipeline, lora, eval_results, source, repo_id, verify, base)
    gen, ref = working_copies(generator, verify)
    lora_used = has_lora(gen.denoiser)
    with staged_folder(out) as tmp:
        adapter_dir = apply_lora(gen, lora, tmp, lambda folder: write_lora_adapter(gen.denoiser, folder))
        plan = choose_pipeline(gen, gamma, pipeline)
        recipe = {
            "sigma_init": gen.sigma_init,
            "sampling_sigmas": list(gen.sampling_sigmas),
            "gamma": gamma,
            "guidance": gen.guidance,
        }
        if plan.kind == "stock":
            recipe["call"] = plan.schedule.call_kwargs()
            pipe = _stock_pipeline(gen, plan.schedule, recipe)
        else:
            pipe = _own_pipeline(gen, gamma)
        save_pipeline(pipe, tmp)
        evals = _copy_evals(eval_results or [], tmp / "eval")
        verified = _verify(tmp, plan, ref, gamma, adapter_dir) if verify else {}
        result = ExportResult(out, plan.kind, plan.reason, type(pipe).__name__, recipe.get("call", {}), verified)
        sched = plan.schedule
        info = card_info(
            gen,
            out,
            repo_id,
            evals,
            pipeline_class=result.pipeline_class,
            reason=plan.reason,
            gamma=gamma,
            guidance=gen.guidance,
            guidance_embedded=has_guidance_embedding(gen.denoiser),
            num_classes=gen.num_classes,
            stock_calls=None if sched is None else {"one": sched.call_kwargs(1), "all": sched.call_kwargs()},
            lora=lora if lora_used else None,
            metadata=meta,
            schedule_rho=None if sched is None else sched.rho,
            num_train_timesteps=None if sched is None else sched.num_train_timesteps,
        )
        write_card_and_record(
            tmp,
            info,
            source=source,
            pipeline=plan.kind,
            recipe=recipe,
            adapter_dir=adapter_dir,
            verified=verified,
            metadata=meta,
        )
    return result


def _export_sd(
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
) -> ExportResult:
    """An SD-family student as the stock ``StableDiffusion(XL)Pipeline`` (:mod:`diffdistill.export.sd`)."""
    from diffdistill.export.sd import build_sd_pipeline, plan_sd, resolve_base, verify_sd, write_sd_lora

    if pipeline == "diffdistill":
        raise ValueError(
            "DiffDistillPipeline takes no prompts: an SD-family student exports as the stock StableDiffusion(XL)"
            "Pipeline (pipeline=auto)"
        )
    base = resolve_base(base, meta)
    gen, ref, plan, lora_used = start_into_base(generator, verify, lambda g: plan_sd(g, base, gamma))
    with staged_folder(out) as tmp:
        adapter_dir = apply_lora(gen, lora, tmp, lambda folder: write_sd_lora(gen, folder, plan.pipeline_class))
        if adapter_dir is not None and has_guidance_embedding(gen.denoiser):
            log.warning(
                "export: the student's guidance embedding (UNet time_cond_proj_dim, time_embedding.cond_proj) is "
                "not part of lora/: apply the LoRA to this folder's UNet, not to the teacher's"
            )
        recipe = {
            "sigma_init": gen.sigma_init,
            "sampling_sigmas": list(gen.sampling_sigmas),
            "timesteps": list(plan.timesteps),
            "guidance_scale": plan.guidance_scale,
            "gamma": gamma,
            "guidance": gen.guidance,
            "scheduler": plan.scheduler,
            "call": plan.call_kwargs(),
        }
        save_pipeline(build_sd_pipeline(gen, plan, recipe), tmp)
        result = finish_into_base(
            tmp,
            gen,
            out,
            plan,
            recipe,
            verify=(lambda: verify_sd(tmp, plan, ref, adapter_dir, VERIFY_ATOL)) if verify else None,
            eval_results=eval_results,
            source=source,
            repo_id=repo_id,
            lora=lora if lora_used else None,
            adapter_dir=adapter_dir,
            metadata=meta,
            gamma=gamma,
            guidance=gen.guidance,
            guidance_embedded=has_guidance_embedding(gen.denoiser),
            timesteps=list(plan.timesteps),
            scheduler=plan.scheduler,
            latents_scale=plan.latents_scale,
        )
    return result


def _copy_evals(files: list[Path], dest: Path) -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for f in files:
        try:
            doc = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping evaluation file %s (%s)", f, e)
            continue
        dest.mkdir(exist_ok=True)
        shutil.copy2(f, dest / Path(f).name)
        docs.append((Path(f).name, doc if isinstance(doc, dict) else {}))
    return docs


def export(
    source: str | Path,
    out: str | Path,
    *,
    ema: str | float | None = "auto",
    gamma: float | None = None,
    pipeline: str = "auto",
    lora: str = "fuse",
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    verify: bool = True,
    base: str | Path | None = None,
) -> ExportResult:
    """Export the student at ``source`` (a run folder, a checkpoint folder or a generator model folder).

    ``ema``: ``"auto"`` (the highest-decay EMA track), a decay, or ``None`` (the online weights). The run's
    ``eval/*.json`` are copied and summarised. ``push_to_hub``: a hub repository id to upload the folder to.
    ``base``: an SD-family or flow (SD3) student's teacher pipeline (default: the teacher path the run recorded).
    """
    from diffdistill.models.io import generator_folder, load_generator

    src = Path(source)
    check_target(out, overwrite)  # before loading anything
    folder = generator_folder(src, ema)
    gen = load_generator(src, ema)
    result = export_pipeline(
        gen,
        out,
        metadata=read_metadata(folder),
        gamma=gamma,
        pipeline=pipeline,
        lora=lora,
        overwrite=overwrite,
        eval_results=eval_files(src),
        source=str(folder),
        repo_id=push_to_hub,
        verify=verify,
        base=base,
    )
    if push_to_hub:
        upload(result.path, push_to_hub, private=private)
    return result


def upload(folder: str | Path, repo_id: str, private: bool = False) -> None:
    """Create the hub model repository ``repo_id`` if needed and upload ``folder`` to it."""
    import huggingface_hub

    huggingface_hub.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    huggingface_hub.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message="diffdistill export"
    )
