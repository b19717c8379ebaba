"""The FID-vs-iteration curve of a training run with in-loop evaluation, as a committed JSON and a plot.

    diffdistill-train experiment=fashion_mnist/sid eval=effnet_fid_fast trainer.eval_every=250 run_dir=RUN
    python benchmarks/fid_curve.py RUN --name sid_fm_fid_curve_cpu --teacher-fid 205.1105 [--status "..."]

Reads the ``kind: eval`` records of ``RUN/metrics.jsonl`` (the trainer's log; a resumed run appends to it, so the
last record of each step wins) and the train records' time stamps, and writes ``results/<name>.json`` (command,
curve, iterations and training seconds, machine) and ``results/<name>.png`` (FID against iterations, the teacher's
own FID as a line). The run's ``config.yaml`` supplies the recipe's name and the command line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import RESULTS, finish_info, machine_info, write_result


def read_curve(run: Path) -> tuple[list[dict[str, Any]], dict[int, float]]:
    """``(eval records sorted by step, train seconds at each logged step)`` from ``run/metrics.jsonl``."""
    evals: dict[int, dict[str, Any]] = {}
    train_sec: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") == "eval":
            evals[int(rec["step"])] = {k: v for k, v in rec.items() if k != "kind"}
        elif rec.get("kind") == "train" and "train_sec" in rec:
            train_sec[int(rec["step"])] = float(rec["train_sec"])
    return [evals[s] for s in sorted(evals)], train_sec


def plot(curve: list[dict[str, Any]], teacher_fid: float | None, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in curve], [r["fid"] for r in curve], "o-", label="one-step student (EMA)")
    if teacher_fid is not None:
        ax.axhline(teacher_fid, color="k", ls="--", lw=1, label=f"teacher, Heun 18 steps ({teacher_fid:.1f})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("FID-EffNet-128 (500 samples)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the run directory (holds metrics.jsonl and config.yaml)")
    ap.add_argument("--name", required=True, help="results/<name>.json and .png")
    ap.add_argument("--teacher-fid", type=float, default=None)
    ap.add_argument("--command", default=None, help="the command line that trained the run (recorded)")
    ap.add_argument("--status", default="complete")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    curve, train_sec = read_curve(args.run)
    if not curve:
        raise SystemExit(f"{args.run}/metrics.jsonl has no eval records (train with eval=... trainer.eval_every=N)")
    for r in curve:
        near = [s for s in train_sec if s <= r["step"]]
        if near:
            r["train_seconds"] = round(train_sec[max(near)], 1)
    name = args.run.name
    cfg_path = args.run / "config.yaml"
    if cfg_path.exists():
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text())
        name = cfg.get("name", name)
    best = min(curve, key=lambda r: r["fid"])
    result = {
        "benchmark": f"{name}: in-loop one-step FID-EffNet-128 against training iterations",
        "command": args.command,
        "status": args.status,
        "note": args.note,
        "teacher_fid_heun18": args.teacher_fid,
        "best": {"step": best["step"], "fid": best["fid"]},
        "last": {"step": curve[-1]["step"], "fid": curve[-1]["fid"]},
        "eval": curve,
        "machine": finish_info(machine_info("cpu")),
    }
    out = write_result(RESULTS / f"{args.name}.json", result)
    plot(curve, args.teacher_fid, result["benchmark"], RESULTS / f"{args.name}.png")
    print(f"wrote {out} and {args.name}.png: best FID {best['fid']:.1f} at step {best['step']}")


if __name__ == "__main__":
    main()
