"""Quality per unit of compute on the packaged Fashion-MNIST teacher: FID-EffNet of every objective's student
after the same CPU budget, beside the teacher's own many-step FID.

    python benchmarks/bench_fm_quality.py [--budget-s 300] [--objectives dmd cd ...]

For each objective in ``OBJECTIVES`` that has a recipe ``configs/experiment/fashion_mnist/<name>.yaml`` (and for
every other recipe there, e.g. ``lcm_lora``) the run is
composed exactly as ``diffdistill-train experiment=fashion_mnist/<name>`` composes it, then trained until
``trainer.max_time_s`` seconds were spent in training iterations (sampling, evaluation and checkpointing excluded;
``max_steps`` is lifted). The EMA generator is scored with ``eval=effnet_fid_fast`` (FID/KID of 500 samples at
128 px against 5,000 test images, the protocol of the README's published numbers) at one step and, where the
recipe defines a few-step sampler, at two steps. The teacher is scored with the same protocol with its Heun
sampler (18 steps, 35 evaluations). The final sample grid of each run (teacher | one-step | few-step, same
seeds) is copied to ``docs/images/fm_budget_<name>.png``. Objectives without a Fashion-MNIST recipe are listed
as skipped; a failure is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, ROOT, finish_info, machine_info, write_result

import diffdistill.objectives  # noqa: F401  (registers every objective)
from diffdistill.objectives.base import OBJECTIVES

RECIPES = ROOT / "diffdistill" / "configs" / "experiment" / "fashion_mnist"
IMAGES = ROOT / "docs" / "images"


def evaluator(num_images: int, threads: int):
    from hydra.utils import instantiate

    from diffdistill.cli.common import compose_config

    cfg = compose_config(["eval=effnet_fid_fast", f"eval.num_images={num_images}", f"num_threads={threads}"], "eval")
    ev = instantiate(cfg.eval, device="cpu")
    ev.results_path = None
    return ev


def score(ev, model, steps: int) -> dict[str, float]:
    ev.sampler_steps = steps
    tic = time.perf_counter()
    with torch.random.fork_rng():
        metrics = ev(model)
    return {**{k: round(float(v), 4) for k, v in metrics.items()}, "eval_seconds": round(time.perf_counter() - tic, 1)}


def train_one(name: str, budget_s: float, threads: int, runs: Path) -> tuple[dict[str, Any], Path]:
    from diffdistill.cli.common import compose_config
    from diffdistill.training.builders import build_trainer

    run_dir = runs / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = compose_config(
        [
            f"experiment=fashion_mnist/{name}",
            f"run_dir={run_dir}",
            "trainer.device=cpu",
            "trainer.max_steps=100000000",
            f"trainer.max_time_s={budget_s}",
            "trainer.checkpoint_every=100000000",  # one checkpoint, at the end
            "trainer.sample_every=100000000",  # one grid, at the end
            "eval=none",
            f"trainer.num_threads={threads}",
        ]
    )
    trainer = build_trainer(cfg)
    trainer.fit()
    paper = getattr(trainer.objective, "paper", None)
    row = {
        "recipe_name": name,
        "objective": trainer.objective.name,
        "paper": paper.__dict__ if paper else None,
        "recipe": f"configs/experiment/fashion_mnist/{name}.yaml",
        "iterations": trainer.step,
        "train_seconds": round(trainer.train_seconds, 1),
        "seconds_per_iteration": round(trainer.train_seconds / max(1, trainer.step), 3),
        "pass_cost_per_iteration": trainer.objective.pass_count().cost(),
        "sampling_sigmas": [float(s) for s in trainer.ema_generator().sampling_sigmas],
        "optimizer": {k: cfg.optim[k] for k in ("name", "lr") if k in cfg.optim},
        "batch_size": int(cfg.trainer.batch_size),
    }
    return row, run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=300.0, help="training seconds per objective")
    ap.add_argument("--objectives", nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-images", type=int, default=500)
    ap.add_argument("--skip-teacher", action="store_true")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench_fm_quality"))
    ap.add_argument("--images", default=str(IMAGES), help="where the final sample grids are copied")
    ap.add_argument("--note", default="")
    ap.add_argument("--append", action="store_true", help="keep the other rows of --out (and its teacher row)")
    ap.add_argument("--out", default=str(RESULTS / "fm_quality_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    info = machine_info("cpu")
    # every registered objective, then the other Fashion-MNIST recipes (variants such as lcm_lora)
    # (objectives that train a denoiser, such as the EDM teacher recipe, have no one-step student to score)
    distilling = sorted(n for n, cls in OBJECTIVES.items() if cls.student_sampler == "one_step")
    names = args.objectives or distilling + sorted(
        p.stem for p in RECIPES.glob("*.yaml") if p.stem not in OBJECTIVES and p.stem != "teacher"
    )
    ev = evaluator(args.num_images, args.threads)
    result: dict[str, Any] = {
        "benchmark": "fm_quality",
        "machine": info,
        "note": args.note,
        "setup": {
            "teacher": "packaged fashion_mnist (diffdistill/assets/teachers/fashion_mnist)",
            "budget_train_seconds": args.budget_s,
            "eval": ev.protocol(),
            "ema": "highest-decay track of each recipe",
        },
        "teacher": None,
        "objectives": [],
        "skipped": [],
    }
    if args.append and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        result["teacher"] = old.get("teacher")
        result["objectives"] = [r for r in old.get("objectives", []) if r.get("recipe_name") not in names]
        result["machine_of_kept_rows"] = old.get("machine")
    if not args.skip_teacher:
        from diffdistill.models import Teacher

        teacher = Teacher.from_pretrained("fashion_mnist")
        result["teacher"] = {"sampler": "Heun 18 steps (35 NFE)", **score(ev, teacher, 18)}
        print("teacher", result["teacher"], flush=True)
    runs = Path(args.runs)
    for name in names:
        if not (RECIPES / f"{name}.yaml").exists():
            why = f"no recipe configs/experiment/fashion_mnist/{name}.yaml"
            result["skipped"].append({"recipe_name": name, "why": why})
            continue
        try:
            row, run_dir = train_one(name, args.budget_s, args.threads, runs)
            from diffdistill import load_generator

            gen = load_generator(run_dir / "checkpoints" / "last", ema="auto")
            row["one_step"] = score(ev, gen, 1)
            if len(gen.sampling_sigmas) > 1:
                row["two_step"] = score(ev, gen, 2)
            grids = sorted((run_dir / "samples").glob("step*.png"))
            if grids:
                images = Path(args.images)
                images.mkdir(parents=True, exist_ok=True)
                dest = images / f"fm_budget_{name}.png"
                shutil.copy(grids[-1], dest)
                row["grid"] = str(dest.relative_to(ROOT)) if dest.is_relative_to(ROOT) else str(dest)
        except Exception as e:  # recorded, not fatal: one broken objective must not hide the others
            tb = traceback.format_exc()[-2000:]
            row = {"recipe_name": name, "error": f"{type(e).__name__}: {e}", "traceback": tb}
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        result["objectives"].append(row)
        write_result(args.out, result)  # partial results survive an interruption
    result["machine"] = finish_info(info)
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
