"""``diffdistill-eval``: score one checkpoint, a list, every checkpoint of a run folder, or a teacher (Hydra).

Image runs are scored by the ``eval`` group (FID/KID...). Runs whose data has a known distribution (the toys,
``data=toy_gaussian`` / ``data=toy_gmm``) are scored against the truth by :mod:`diffdistill.evaluation.toy`
with the ``toy`` settings: moment errors, sliced W2 with its exact-vs-exact floor, mixture mode coverage.
Writes a results JSON recording the protocol (extractor or projections, number of samples, seed range,
checkpoint, EMA track, sampler steps) and a PNG of each metric against training step.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffdistill.cli.common import CONFIG_DIR, friendly_errors

TOY_OUT = "toy"  # results file stem of toy runs: <run_dir>/eval/toy.json


@dataclass
class Target:
    """One thing to evaluate: a checkpoint (with an EMA track) or a teacher."""

    label: str
    checkpoint: str | None
    ema: str | None
    step: int | None
    kind: str  # "checkpoint" | "teacher"


def _as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    if isinstance(v, (list, tuple, ListConfig)):
        return list(v)
    return [v]


def checkpoint_step(path: str | Path) -> int | None:
    """The training step in a ``step<N>`` checkpoint name (``None`` if the name holds none)."""
    m = re.search(r"step[_-]?(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """``<run_dir>/checkpoints/step*/`` sorted by step."""
    from diffdistill.models.io import is_checkpoint

    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        raise FileNotFoundError(f"'{run_dir}' is not a training run folder (no checkpoints/ inside)")
    files = [p for p in folder.glob("step*") if is_checkpoint(p) and checkpoint_step(p) is not None]
    if not files:
        raise FileNotFoundError(f"no checkpoints/step*/ in '{run_dir}'")
    return sorted(files, key=lambda p: checkpoint_step(p))


def resolve_ema(checkpoint: str | Path, ema: Any) -> str | None:
    """``auto`` -> the highest-decay EMA track stored in the checkpoint (``None`` when it holds none)."""
    if ema is None or str(ema).lower() in ("none", "null", "online"):
        return None
    if str(ema) != "auto":
        return str(float(ema))
    from diffdistill.models.io import ema_folders, resolve_checkpoint

    tracks = ema_folders(resolve_checkpoint(checkpoint))
    return str(max(tracks)) if tracks else None


def targets(cfg: DictConfig) -> Iterator[Target]:
    """What ``cfg`` asks to evaluate, in order: teacher, explicit checkpoints, then the run folder's."""
    if cfg.get("teacher"):
        yield Target(f"teacher:{cfg.teacher}", None, None, None, "teacher")
    ckpts = [Path(p) for p in _as_list(cfg.get("checkpoint"))]
    if cfg.get("run_dir"):
        ckpts += run_checkpoints(cfg.run_dir)
    from diffdistill.models.io import resolve_checkpoint

    for c in ckpts:
        if not c.exists():
            raise FileNotFoundError(f"checkpoint '{c}' does not exist")
        c = resolve_checkpoint(c)
        for ema in _as_list(cfg.get("ema")) or [None]:
            track = resolve_ema(c, ema)
            yield Target(f"{c.name}[ema={track}]", str(c), track, checkpoint_step(c), "checkpoint")


def load_target(t: Target, cfg: DictConfig):
    """The model of a target: a generator from a training checkpoint, or a teacher."""
    if t.kind == "teacher":
        from diffdistill.models import Teacher

        return Teacher.from_pretrained(cfg.teacher, guidance_scale=float(cfg.get("guidance_scale", 1.0)))
    from diffdistill.models.io import load_generator

    return load_generator(t.checkpoint, ema=None if t.ema is None else float(t.ema))


def default_out(cfg: DictConfig, extractor_id: str) -> Path:
    if cfg.get("out"):
        return Path(cfg.out)
    if cfg.get("run_dir"):
        return Path(cfg.run_dir) / "eval" / f"{extractor_id}.json"
    return Path("eval_results") / f"{extractor_id}.json"


# ---------------------------------------------------------------------------------------------- what the run's data is
def run_config(checkpoint: str | Path, from_run_folder: bool = True) -> dict[str, Any]:
    """The resolved run config of a checkpoint: with ``from_run_folder`` the cheap ``<run>/config.yaml`` next to
    ``<run>/checkpoints/`` when there is one, else the config stored in the checkpoint (what it is rebuilt from)."""
    ckpt = Path(checkpoint)
    cfg_file = ckpt.parent.parent / "config.yaml"
    if from_run_folder and ckpt.parent.name == "checkpoints" and cfg_file.is_file():
        return OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=True)
    import json

    from diffdistill.models.io import RUN_CONFIG, resolve_checkpoint

    path = resolve_checkpoint(ckpt) / RUN_CONFIG
    return json.loads(path.read_text()) if path.exists() else {}


def is_image_shape(shape: Any) -> bool:
    """``(C, H, W)`` with ``C`` in (1, 3): what the image metrics score."""
    return shape is not None and len(tuple(shape)) == 3 and int(tuple(shape)[0]) in (1, 3)


def data_kind(data_cfg: Any) -> str:
    """``known`` (a distribution with exact samples), ``images``, or ``other`` for a run's ``data`` config.

    Decided from the class (or factory return type) of ``_target_`` where possible; otherwise the dataset is built
    and its ``sample_shape`` inspected. A config without ``_target_`` counts as images (scored as before).
    """
    import typing

    from hydra.utils import get_object, instantiate

    from diffdistill.data.images import ImageTensorDataset
    from diffdistill.evaluation.toy import has_known_distribution

    target = (data_cfg or {}).get("_target_") if isinstance(data_cfg, (dict, DictConfig)) else None
    if target is None:
        return "images"
    try:
        obj = get_object(str(target))
    except Exception:  # noqa: BLE001 - not importable here: the image path reports it when rebuilding the model
        return "images"
    if has_known_distribution(obj):
        return "known"
    if isinstance(obj, type) and issubclass(obj, ImageTensorDataset):
        return "images"
    try:
        ret = typing.get_type_hints(obj).get("return") if callable(obj) and not isinstance(obj, type) else None
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to building the dataset
        ret = None
    if isinstance(ret, type) and issubclass(ret, ImageTensorDataset):
        return "images"
    ds = instantiate(data_cfg)
    if has_known_distribution(ds):
        return "known"
    return "images" if is_image_shape(getattr(ds, "sample_shape", None)) else "other"


def _no_metric_error(where: str, data_cfg: Any, shape: Any = None) -> ValueError:
    target = (data_cfg or {}).get("_target_", "?") if isinstance(data_cfg, (dict, DictConfig)) else "?"
    got = f"sample shape {tuple(shape)}" if shape is not None else "its samples are not [1|3, H, W] images"
    return ValueError(
        f"cannot evaluate {where}: its data ({target}) has no known distribution and {got}; diffdistill-eval scores "
        "images (FID/KID) or data with a known distribution (exact_samples, true_mean, true_covariance)"
    )


def split_targets(todo: list[Target]) -> tuple[list[Target], list[tuple[Target, Any]]]:
    """Image targets (teachers included) and toy targets with their run's ``data`` config; raises (one line) for
    a checkpoint whose data has no known distribution and no images."""
    images: list[Target] = []
    toy: list[tuple[Target, Any]] = []
    kinds: dict[str, tuple[str, Any]] = {}
    truth: dict[str, Any] = {}
    for t in todo:
        if t.kind != "checkpoint":
            images.append(t)
            continue
        if t.checkpoint not in kinds:
            try:
                run = run_config(t.checkpoint)
            except (ValueError, FileNotFoundError):  # unreadable here: the image path reports it as before
                run = {}
            data_cfg = run.get("data")
            latent = str((run.get("backbone") or {}).get("_target_", "")).endswith(TEXT_TO_IMAGE_TEACHERS)
            # a latent text-to-image student is scored on its decoded images, whatever its data (prompts, latents)
            kinds[t.checkpoint] = ("images" if latent else data_kind(data_cfg), data_cfg)
        kind, data_cfg = kinds[t.checkpoint]
        if kind == "other":
            from hydra.utils import instantiate

            shape = getattr(instantiate(data_cfg), "sample_shape", None)
            raise _no_metric_error(f"checkpoint '{t.checkpoint}'", data_cfg, shape)
        if kind == "known":
            if t.checkpoint not in truth:  # the checkpoint's own config: the data its generator was trained on
                truth[t.checkpoint] = run_config(t.checkpoint, from_run_folder=False).get("data") or data_cfg
            toy.append((t, truth[t.checkpoint]))
        else:
            images.append(t)
    return images, toy


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(cfg: DictConfig) -> Path:
    """Run the evaluation ``cfg`` describes; returns the results JSON path (the toy one when a call mixes image
    and toy checkpoints)."""
    import torch

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    todo = list(targets(cfg))
    if not todo:
        raise ValueError("nothing to evaluate: give checkpoint=<file>, run_dir=<run folder> or teacher=<name>")
    images, toy = split_targets(todo)
    out = evaluate_images(cfg, images) if images else None
    return evaluate_toy_targets(cfg, toy) if toy else out


TEXT_TO_IMAGE_TEACHERS = ("sd_teacher", "sd3_teacher")


def attach_text_to_image(evaluator, checkpoint: str | Path) -> None:
    """For a student of a latent text-to-image teacher (its run's ``backbone`` builds one with ``sd_teacher`` /
    ``sd3_teacher``): give the evaluator the teacher's text encoder and VAE, and the run data's captions, so latents are
    decoded and each image is conditioned on (and CLIP-scored against) its prompt. Other runs are left as they are."""
    from hydra.utils import instantiate

    run = run_config(checkpoint)
    backbone = run.get("backbone") or {}
    if not str(backbone.get("_target_", "")).endswith(TEXT_TO_IMAGE_TEACHERS) or evaluator.latent is not None:
        return
    teacher = instantiate(backbone)
    dataset = None
    if not evaluator.prompts and run.get("data"):
        dataset = instantiate(run["data"])
    evaluator.attach(teacher.to(evaluator.device), dataset)


def evaluate_images(cfg: DictConfig, todo: list[Target]) -> Path:
    """Score image targets with the ``eval`` group's :class:`~diffdistill.evaluation.Evaluator`."""
    from hydra.utils import instantiate

    from diffdistill.evaluation import Evaluator, plot_results, write_results

    evaluator = instantiate(cfg.eval, device=cfg.get("device") or "cpu")
    if not isinstance(evaluator, Evaluator):
        raise ValueError("the eval group builds no Evaluator (eval=none?); choose e.g. eval=effnet_fid")
    evaluator.results_path = None  # the CLI writes its own rows (with checkpoint and EMA track)
    ex = evaluator.extractor or evaluator.clip
    out = default_out(cfg, ex.id)
    done: set[tuple] = set()
    if cfg.get("skip_existing", True) and out.is_file():
        from diffdistill.evaluation import read_results

        done = {(r.get("checkpoint"), r.get("ema"), r.get("step")) for r in read_results(out)["results"]}
    for t in todo:
        if t.kind == "checkpoint" and (t.checkpoint, t.ema, t.step) in done:
            print(f"skip {t.label} (already in {out})")
            continue
        model = load_target(t, cfg).to(evaluator.device)
        if t.kind == "checkpoint":
            attach_text_to_image(evaluator, t.checkpoint)
        elif getattr(model, "latent", None) is not None:  # a text-to-image teacher (prompts: eval.prompts)
            evaluator.attach(model)
        shape = getattr(model, "sample_shape", None)
        if shape is not None and evaluator.latent is not None:
            shape = evaluator.latent.image_shape(tuple(shape))
        if shape is not None and not is_image_shape(shape):
            raise _no_metric_error(t.label, None, shape)
        scores = evaluator(model, t.step)
        row = evaluator.record(
            scores, step=t.step, checkpoint=t.checkpoint or cfg.get("teacher"), ema=t.ema, kind=t.kind
        )
        write_results(out, evaluator.protocol(), [row])
        print(f"{t.label}: " + ", ".join(f"{k}={v:.4g}" for k, v in scores.items()))
    if cfg.get("plot", True):
        try:
            png = plot_results(out)
            print(f"plot: {png}")
        except ValueError:  # no row with a training step (e.g. a teacher only)
            pass
    print(f"results: {out}")
    return out


def _toy_comparable(p: dict[str, Any]) -> dict[str, Any]:
    """The parts of a toy protocol two results must share to live in one file."""
    modes = p.get("modes") or {}
    return {
        "num_samples": p.get("num_samples"),
        "seed_range": p.get("seed_range"),
        "distribution": p.get("distribution"),
        "exact_seeds": (p.get("exact_samples") or {}).get("seeds"),
        "sliced_w2": {k: (p.get("sliced_w2") or {}).get(k) for k in ("num_projections", "projection_seed")},
        "modes": {k: modes.get(k) for k in ("assignment", "coverage_fraction", "quality_std")},
    }


TOY_COLUMNS = (
    ("step", "step"),
    ("ema", "ema"),
    ("sampler_steps", "steps"),
    ("mean_error", "mean_err"),
    ("cov_error_rel", "cov_rel"),
    ("sw2", "sw2"),
    ("mass_error_max", "mass_err"),
    ("modes_covered", "modes"),
)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table_line(label: str, row: dict[str, Any], columns: list[tuple[str, str]], width: int) -> str:
    return label.ljust(width) + "".join(f"  {_cell(row.get(k)):>{max(len(h), 9)}}" for k, h in columns)


def evaluate_toy_targets(cfg: DictConfig, todo: list[tuple[Target, Any]]) -> Path:
    """Score checkpoints of runs whose data has a known distribution against the truth (``toy`` settings)."""
    import json

    from hydra.utils import instantiate

    from diffdistill.evaluation import plot_results, read_results, write_results
    from diffdistill.evaluation.generation import sampler_spec
    from diffdistill.evaluation.toy import evaluate_toy, is_mixture, toy_protocol, toy_reference

    tc = cfg.get("toy") or {}
    opts = {
        "num_samples": int(tc.get("num_samples", 16384)),
        "seed": int(tc.get("seed", 0)),
        "num_projections": int(tc.get("num_projections", 128)),
        "projection_seed": int(tc.get("projection_seed", 0)),
        "reference_seed": int(tc.get("reference_seed", 1_000_000)),
        "assignment": str(tc.get("assignment", "nearest")),
        "coverage_fraction": float(tc.get("coverage_fraction", 0.1)),
        "quality_std": None if tc.get("quality_std") is None else float(tc.get("quality_std")),
    }
    ref_keys = ("num_samples", "num_projections", "projection_seed", "reference_seed", "assignment")
    ref_keys += ("coverage_fraction", "quality_std")
    steps, sigmas = tc.get("sampler_steps"), None if tc.get("sigmas") is None else [float(s) for s in tc.sigmas]
    device = cfg.get("device") or "cpu"
    out = default_out(cfg, TOY_OUT)
    old = read_results(out) if out.is_file() else None
    done: set[tuple] = set()
    if old is not None and cfg.get("skip_existing", True):
        done = {(r.get("checkpoint"), r.get("ema"), r.get("step"), r.get("sampler_steps")) for r in old["results"]}
    cache: dict[str, tuple[Any, Any]] = {}  # data config -> (dataset, exact reference)
    width = max(len("exact-vs-exact floor"), *(len(t.label) for t, _ in todo))
    columns: list[tuple[str, str]] | None = None
    for t, data_cfg in todo:
        key = json.dumps(data_cfg, sort_keys=True, default=str)
        if key not in cache:
            dataset = instantiate(data_cfg)
            ref = toy_reference(dataset, **{k: opts[k] for k in ref_keys})
            proto_args = [opts[k] for k in ("num_samples", "seed", "assignment", "coverage_fraction", "quality_std")]
            proto = toy_protocol(dataset, ref, *proto_args)
            if old is not None and _toy_comparable(old["protocol"]) != _toy_comparable(proto):
                raise ValueError(f"'{out}' holds results of a different evaluation protocol; write to another file")
            cache[key] = (dataset, ref)
        dataset, ref = cache[key]
        model = load_target(t, cfg).to(device)
        if (t.checkpoint, t.ema, t.step, sampler_spec(model, steps, sigmas).steps) in done:
            print(f"skip {t.label} (already in {out})")
            continue
        res = evaluate_toy(
            model,
            dataset,
            **opts,
            batch_size=int(tc.get("batch_size", 4096)),
            sampler_steps=steps,
            sigmas=sigmas,
            device=device,
            reference=ref,
        )
        row = {
            "step": t.step,
            "checkpoint": t.checkpoint,
            "ema": t.ema,
            "sampler_steps": res.sampler.get("sampler_steps"),
            **res.scores,
            **({"mode_masses": res.modes["masses"]} if res.modes else {}),
            "seconds": res.seconds,
            "kind": t.kind,
        }
        floor_row = {
            "step": None,
            "checkpoint": f"exact samples (seed {ref.seeds[1]})",
            "ema": None,
            "sampler_steps": None,
            **ref.floor,
            "kind": "exact-vs-exact floor",
        }
        write_results(out, res.protocol, [floor_row, row])
        if columns is None:
            columns = [(k, h) for k, h in TOY_COLUMNS if k in row or not k.startswith(("mass", "modes"))]
            modes = f", modes by {opts['assignment']} assignment" if is_mixture(dataset) else ""
            print(
                f"toy evaluation of {res.protocol['distribution']['dataset']}: {opts['num_samples']} samples "
                f"(seeds {opts['seed']}..), SW2 on {opts['num_projections']} projections (seed "
                f"{opts['projection_seed']}), exact sets seeds {ref.seeds[0]}/{ref.seeds[1]}{modes}"
            )
            print(_table_line("target", {k: h for k, h in columns}, columns, width))
            print(_table_line("exact-vs-exact floor", ref.floor, columns, width))
        print(_table_line(t.label, row, columns, width))
    if cfg.get("plot", True) and out.is_file():
        try:
            print(f"plot: {plot_results(out)}")
        except ValueError:  # no row with a training step
            pass
    print(f"results: {out}")
    return out


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        evaluate(cfg)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The ``eval`` config with overrides, without running (for tests and notebooks)."""
    from hydra import compose as h_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = h_compose(config_name="eval", overrides=list(overrides or []))
    OmegaConf.set_struct(cfg, True)
    return cfg


if __name__ == "__main__":
    main()
