"""``diffdistill-eval``: score one checkpoint, a list, every checkpoint of a run folder, or a teacher (Hydra).

Writes a results JSON recording the protocol (extractor, weights hash, number of images, seed range,
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
    """The training step in a ``step<N>.pt`` file name (``None`` if the name holds none)."""
    m = re.search(r"step[_-]?(\d+)", Path(path).stem)
    return int(m.group(1)) if m else None


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """``<run_dir>/checkpoints/step*.pt`` sorted by step."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        raise FileNotFoundError(f"'{run_dir}' is not a training run folder (no checkpoints/ inside)")
    files = [p for p in folder.glob("step*.pt") if checkpoint_step(p) is not None]
    if not files:
        raise FileNotFoundError(f"no checkpoints/step*.pt in '{run_dir}'")
    return sorted(files, key=lambda p: checkpoint_step(p))


def resolve_ema(checkpoint: str | Path, ema: Any) -> str | None:
    """``auto`` -> the highest-decay EMA track stored in the checkpoint (``None`` when it holds none)."""
    if ema is None or str(ema).lower() in ("none", "null", "online"):
        return None
    if str(ema) != "auto":
        return str(float(ema))
    from diffdistill.training.checkpoint import load_checkpoint

    tracks = load_checkpoint(checkpoint).get("ema") or {}
    return str(max(tracks, key=float)) if tracks else None


def targets(cfg: DictConfig) -> Iterator[Target]:
    """What ``cfg`` asks to evaluate, in order: teacher, explicit checkpoints, then the run folder's."""
    if cfg.get("teacher"):
        yield Target(f"teacher:{cfg.teacher}", None, None, None, "teacher")
    ckpts = [Path(p) for p in _as_list(cfg.get("checkpoint"))]
    if cfg.get("run_dir"):
        ckpts += run_checkpoints(cfg.run_dir)
    for c in ckpts:
        if not c.is_file():
            raise FileNotFoundError(f"checkpoint '{c}' does not exist")
        for ema in _as_list(cfg.get("ema")) or [None]:
            track = resolve_ema(c, ema)
            yield Target(f"{c.name}[ema={track}]", str(c), track, checkpoint_step(c), "checkpoint")


def load_target(t: Target, cfg: DictConfig):
    """The model of a target: a generator from a training checkpoint, or a teacher."""
    if t.kind == "teacher":
        from diffdistill.models import Teacher

        return Teacher.from_pretrained(cfg.teacher, guidance_scale=float(cfg.get("guidance_scale", 1.0)))
    from diffdistill.training.trainer import load_generator

    return load_generator(t.checkpoint, ema=t.ema)


def default_out(cfg: DictConfig, extractor_id: str) -> Path:
    if cfg.get("out"):
        return Path(cfg.out)
    if cfg.get("run_dir"):
        return Path(cfg.run_dir) / "eval" / f"{extractor_id}.json"
    return Path("eval_results") / f"{extractor_id}.json"


def evaluate(cfg: DictConfig) -> Path:
    """Run the evaluation ``cfg`` describes; returns the results JSON path."""
    import torch
    from hydra.utils import instantiate

    from diffdistill.evaluation import Evaluator, plot_results, write_results

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    todo = list(targets(cfg))
    if not todo:
        raise ValueError("nothing to evaluate: give checkpoint=<file>, run_dir=<run folder> or teacher=<name>")
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
