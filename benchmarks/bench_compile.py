"""``trainer.compile=true`` (``torch.compile`` of the trainable roles' denoisers) against eager, per objective.

    python benchmarks/bench_compile.py [--objectives cd dmd ...] [--iters 60]

Setup: each objective's toy recipe of ``bench_toy_quality.py`` (``experiment=toy_gmm/<objective>``: 2-D Gaussian
mixture, analytic teacher, residual-MLP roles, here with random weights: ``toy_mlp``, no fit), so every registered
objective runs. For each objective and each of eager /
compiled, a fresh trainer takes ``--warmup`` iterations (for the compiled run this is where inductor compiles;
its wall time is recorded as ``first_iterations_s``), then ``--repeats`` timed groups of ``--iters`` iterations;
the steady-state figure is the median ms per iteration. On the 2-core CPU VM inductor needed more than 10 minutes
to compile one fine-tune step of the Fashion-MNIST UNet, so the UNet is not in this benchmark; a GPU run should add
it (``bench_step.py --compile``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
from _common import RESULTS, finish_info, machine_info, write_result
from bench_toy_quality import compose
from omegaconf import open_dict

import diffdistill.objectives  # noqa: F401  (registers every objective)
from diffdistill.objectives.base import OBJECTIVES


def run_case(name: str, compiled: bool, args) -> dict[str, Any]:
    from diffdistill.training.builders import build_trainer

    over = ["student/denoiser=toy_mlp", "fake_score/denoiser=toy_mlp", f"trainer.batch_size={args.batch}"]
    cfg = compose(name, "circle8", over)
    with tempfile.TemporaryDirectory() as tmp, open_dict(cfg):
        cfg.trainer.compile, cfg.run_dir, cfg.logger = compiled, tmp, None
        cfg.trainer.max_steps, cfg.trainer.sample_every, cfg.trainer.checkpoint_every = 10**6, 0, 0
        trainer = build_trainer(cfg)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            trainer.train_step()
        first = time.perf_counter() - t0
        groups = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.iters):
                trainer.train_step()
            groups.append(1000 * (time.perf_counter() - t0) / args.iters)
    return {"first_iterations_s": round(first, 2), "ms_per_iteration": round(statistics.median(groups), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=str(RESULTS / "compile_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("diffdistill").setLevel(logging.ERROR)
    info = machine_info("cpu")
    names = args.objectives or sorted(OBJECTIVES)
    rows = []
    for name in names:
        row: dict[str, Any] = {"objective": name}
        for compiled in (False, True):
            key = "compiled" if compiled else "eager"
            try:
                row[key] = run_case(name, compiled, args)
            except Exception as e:  # noqa: BLE001  (recorded: e.g. forward-mode AD under inductor)
                row[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if "ms_per_iteration" in row["eager"] and "ms_per_iteration" in row["compiled"]:
            row["speedup"] = round(row["eager"]["ms_per_iteration"] / row["compiled"]["ms_per_iteration"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "benchmark": "compile",
        "machine": finish_info(info),
        "note": args.note,
        "setup": {
            "network": f"toy residual MLP (student/denoiser=toy_mlp: 3 blocks of 128, 2-D), batch {args.batch}",
            "compile": "trainer.compile=true: torch.compile (inductor, default mode) of each trainable role's denoiser",
            "warmup_iterations": args.warmup,
            "timed": f"median over {args.repeats} groups of {args.iters} iterations",
            "torch_threads": torch.get_num_threads(),
        },
        "objectives": rows,
    }
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
