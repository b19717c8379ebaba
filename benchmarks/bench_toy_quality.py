"""Every objective's toy recipe against the exact distribution, on mixtures of several shapes and dimensions.

    python benchmarks/bench_toy_quality.py [--objectives cd dmd ...] [--mixtures circle8 d8k6 ...]
        [--set trainer.max_steps=3000 ...] [--out benchmarks/results/toy_quality.json]

Each objective in the registry is run from its recipe, ``experiment=toy_gmm/<objective>`` (the exact mixture
teacher, ``backbone=analytic``; residual-MLP roles regressed onto it first, ``toy_mlp_fitted``), through the same
builders and trainer as ``diffdistill-train``, on every mixture of ``MIXTURES`` (the recipe's ``data`` keys
overridden; nothing else changes between mixtures: a recipe must not be tuned to one). Every ``--eval-every``
iterations the EMA student's one-step samples (and its two-step samples on ``[sigma_init, sigma_mid]``,
``sigma_mid = 0.821 sigma_data / 0.5``, the CIFAR-10 two-step point of Song et al. 2023 carried to the data's
scale) are scored by :func:`diffdistill.evaluation.toy.evaluate_toy`: sliced W2 (128 directions) against 20k
exact samples, as a multiple of the exact-vs-exact floor, and the largest error of a mode's mass (posterior
assignment). References per mixture: the floor and the exact teacher's 18-step Heun sampler (35 evaluations).
The JSON records the curves, the final scores, the wall time of each run (training plus the roles' fit, on this
machine) and whether each recipe meets the bar (one step: SW2 <= 2x floor and no mode's mass off by > 0.02; two
steps: SW2 <= the teacher's Heun-18); the PNG plots the curves.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, finish_info, machine_info, write_result
from omegaconf import open_dict

import diffdistill.objectives  # noqa: F401  (registers every objective)
from diffdistill.objectives.base import OBJECTIVES

# mixtures of other shapes, radii, widths, weights and dimensions than the project's own (circle8)
MIXTURES: dict[str, dict[str, Any]] = {
    "circle8": {},  # data=toy_gmm as shipped: 8 modes on a circle of radius 2, std 0.1, 2-D
    "grid9": {
        "layout": "grid",
        "num_components": 9,
        "radius": 1.5,
        "std": 0.15,
        "weights": [3, 1, 2, 1, 3, 1, 2, 1, 3],
    },  # fmt: skip
    "ring5": {"num_components": 5, "radius": 4.0, "std": [0.2, 0.4, 0.3, 0.5, 0.25]},
    "d8k6": {"dim": 8, "num_components": 6, "radius": 1.5, "std": 0.2, "layout": "random", "seed": 3},
}
ONE_STEP_BAR, MASS_BAR = 2.0, 0.02


def _value(v: Any) -> str:
    return "[" + ",".join(str(x) for x in v) + "]" if isinstance(v, list) else str(v)


def compose(objective: str, mixture: str, extra: list[str]):
    from diffdistill.cli.common import compose_config

    data = [f"data.{k}={_value(v)}" for k, v in MIXTURES[mixture].items()]
    return compose_config([f"experiment=toy_gmm/{objective}", *data, "trainer.device=cpu", *extra])


# the intermediate sigma of two-step sampling, in units of c = sigma_data / 0.5: 0.821 is the CIFAR-10 two-step
# point of Song et al. 2023 (Sec. 6); smaller ones re-noise less
TWO_STEP_MIDS = (0.821, 0.4, 0.2)


def two_step_sigmas(generator, sigma_data: float, mid: float) -> list[float]:
    return [float(generator.sigma_init), mid * sigma_data / 0.5]


def evaluate(trainer, dataset, reference, num: int) -> dict[str, Any]:
    """Scores of the highest-decay EMA track (the trainer's default student); where the run keeps several
    tracks (``trainer.ema_decays``), each other one's one-step scores under ``by_ema`` (an EMA ablation for the
    price of one run)."""
    out = evaluate_track(trainer, dataset, reference, num, None)
    others = sorted(trainer.emas)[:-1]
    if others:
        out["by_ema"] = {
            f"{d:g}": {k: v for k, v in evaluate_track(trainer, dataset, reference, num, d).items()
                       if k.startswith(("one_step", "two_step_sw2"))}
            for d in others
        }  # fmt: skip
    return out


def evaluate_track(trainer, dataset, reference, num: int, decay: float | None) -> dict[str, float]:
    from diffdistill.evaluation.toy import evaluate_toy

    gen = trainer.ema_generator(decay).eval()
    floor = reference.floor["sw2"]
    out: dict[str, float] = {}
    steps = {"one_step": None}
    if trainer.objective.few_step_student:
        for mid in TWO_STEP_MIDS:
            steps[f"two_step_{mid:g}"] = two_step_sigmas(gen, float(dataset.sigma_data), mid)
    with torch.random.fork_rng():
        for key, sigmas in steps.items():
            if trainer.objective.student_sampler == "heun":  # a denoiser (objective=edm): sampled like the teacher
                r = evaluate_toy(gen.denoiser, dataset, num, sampler_steps=18, assignment="posterior",
                                 reference=reference)  # fmt: skip
                key = "heun18"
            else:
                r = evaluate_toy(gen, dataset, num, sigmas=sigmas, assignment="posterior", reference=reference)
            sw2 = r.scores["sw2"]
            out[f"{key}_sw2_over_floor"] = round(sw2 / floor, 3) if math.isfinite(sw2) else None
            out[f"{key}_mass_error_max"] = round(r.scores["mass_error_max"], 4)
            # the mass between modes (beyond 3 std of every mode): what a continuous one-step map must bridge
            out[f"{key}_bridge_fraction"] = round(1.0 - r.scores["high_quality_fraction"], 4)
    gen.train()
    twos = [k for k in out if k.startswith("two_step_") and k.endswith("_sw2_over_floor") and out[k] is not None]
    if twos:
        best = min(twos, key=lambda k: out[k])
        out["two_step_sw2_over_floor"] = out[best]
        out["two_step_best_mid"] = float(best.split("_")[2])
    return out


def run_one(objective: str, mixture: str, args, reference_cache: dict) -> dict[str, Any]:
    from hydra.utils import instantiate

    from diffdistill.evaluation.toy import evaluate_toy, toy_reference
    from diffdistill.models.teacher import Teacher
    from diffdistill.training.builders import build_trainer

    cfg = compose(objective, mixture, args.set)
    with tempfile.TemporaryDirectory() as tmp, open_dict(cfg):
        cfg.run_dir, cfg.logger = tmp, None
        cfg.trainer.sample_every, cfg.trainer.checkpoint_every = 0, 0
        dataset = instantiate(cfg.data)
        if mixture not in reference_cache:
            ref = toy_reference(dataset, args.num_eval, assignment="posterior")
            heun = evaluate_toy(Teacher(dataset.teacher()), dataset, args.num_eval, sampler_steps=18,
                                assignment="posterior", reference=ref)  # fmt: skip
            reference_cache[mixture] = (ref, {
                "dataset": dataset.name,
                "sigma_data": round(float(dataset.sigma_data), 5),
                "floor_sw2": round(ref.floor["sw2"], 5),
                "floor_mass_error_max": round(ref.floor["mass_error_max"], 4),
                "teacher_heun18_sw2_over_floor": round(heun.scores["sw2"] / ref.floor["sw2"], 3),
                "teacher_heun18_mass_error_max": round(heun.scores["mass_error_max"], 4),
                "floor_bridge_fraction": round(1.0 - ref.floor["high_quality_fraction"], 4),
            })  # fmt: skip
        ref, info = reference_cache[mixture]
        t0 = time.perf_counter()
        trainer = build_trainer(cfg)
        build_s = time.perf_counter() - t0
        curve, train_s = [], 0.0
        steps = int(cfg.trainer.max_steps)
        for it in range(1, steps + 1):
            t1 = time.perf_counter()
            trainer.train_step()
            train_s += time.perf_counter() - t1
            if it % args.eval_every == 0 or it == steps:
                curve.append({"iteration": it, "train_seconds": round(train_s, 1), **evaluate(trainer, dataset, ref,
                              args.num_eval)})  # fmt: skip
                print(objective, mixture, curve[-1], flush=True)
    final = curve[-1]
    one = final.get("one_step_sw2_over_floor") or final.get("heun18_sw2_over_floor")
    mass = final.get("one_step_mass_error_max", final.get("heun18_mass_error_max"))
    two = final.get("two_step_sw2_over_floor")
    return {
        "objective": objective,
        "mixture": mixture,
        "steps": steps,
        "batch_size": int(cfg.trainer.batch_size),
        "fit_and_build_seconds": round(build_s, 1),
        "train_seconds": round(train_s, 1),
        "final": final,
        "meets_one_step_bar": bool(one is not None and one <= ONE_STEP_BAR and mass <= MASS_BAR),
        "meets_two_step_bar": None if two is None else bool(two <= info["teacher_heun18_sw2_over_floor"]),
        "curve": curve,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixtures = list(result["mixtures"])
    if not mixtures:
        return
    fig, axes = plt.subplots(1, len(mixtures), figsize=(4.5 * len(mixtures), 4), squeeze=False)
    names = sorted({r["objective"] for r in result["runs"]})
    color = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    for ax, mix in zip(axes[0], mixtures):
        for row in (r for r in result["runs"] if r["mixture"] == mix and "curve" in r):
            key = "one_step_sw2_over_floor" if "one_step_sw2_over_floor" in row["final"] else "heun18_sw2_over_floor"
            pts = [(p["iteration"], p[key]) for p in row["curve"] if p.get(key) is not None]
            if pts:
                label = row["objective"] + (" (Heun 18)" if key.startswith("heun") else "")
                ax.plot(*zip(*pts), label=label, color=color[row["objective"]])
        info = result["mixtures"][mix]
        ax.axhline(ONE_STEP_BAR, color="k", ls="--", lw=0.8, label=f"{ONE_STEP_BAR:g}x floor")
        ax.axhline(info["teacher_heun18_sw2_over_floor"], color="gray", ls=":", lw=0.8, label="teacher Heun 18")
        ax.set_yscale("log")
        ax.set_title(f"{mix}: {info['dataset']}", fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("one-step SW2 / floor")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    """One row per objective: one-step SW2 / floor and the largest mode-mass error per mixture (two-step in
    brackets where the student has one); a trailing check mark where the one-step bar is met."""
    mixtures = list(result["mixtures"])
    head = "| objective | " + " | ".join(mixtures) + " |\n|---|" + "---|" * len(mixtures)
    rows = []
    for name in sorted({r["objective"] for r in result["runs"]}):
        cells = []
        for mix in mixtures:
            r = next((r for r in result["runs"] if r["objective"] == name and r["mixture"] == mix), None)
            if r is None or "final" not in r:
                cells.append("error" if r else "-")
                continue
            f = r["final"]
            one = f.get("one_step_sw2_over_floor", f.get("heun18_sw2_over_floor"))
            mass = f.get("one_step_mass_error_max", f.get("heun18_mass_error_max"))
            two = f" ({f['two_step_sw2_over_floor']:.2f})" if f.get("two_step_sw2_over_floor") else ""
            ok = " ✓" if r.get("meets_one_step_bar") else ""
            cells.append(f"{one:.2f} / {mass:.3f}{two}{ok}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    refs = " | ".join(f"{result['mixtures'][m]['teacher_heun18_sw2_over_floor']:.2f}" for m in mixtures)
    rows.append(f"| teacher, Heun 18 | {refs} |")
    return head + "\n" + "\n".join(rows)


def merge(files: list[Path], out: Path) -> None:
    """One result from several runs of this script (e.g. one process per mixture); later files win per row."""
    import json

    parts = [json.loads(f.read_text()) for f in files]
    result = {**parts[0], "runs": [], "mixtures": {}, "machines": [p["machine"] for p in parts]}
    rows: dict[tuple[str, str], dict] = {}
    for part in parts:
        result["mixtures"].update(part["mixtures"])
        rows.update({(r["objective"], r["mixture"]): r for r in part["runs"]})
    result["runs"] = list(rows.values())
    write_result(out, result)
    plot(result, out.with_suffix(".png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", nargs="+", default=None)
    ap.add_argument("--mixtures", nargs="+", default=list(MIXTURES), choices=list(MIXTURES))
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every run")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--num-eval", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=str(RESULTS / "toy_quality.json"))
    ap.add_argument("--update", action="store_true", help="keep the other (objective, mixture) rows of --out")
    ap.add_argument("--merge", nargs="+", default=None, help="combine these result files into --out (and plot)")
    ap.add_argument("--table", action="store_true", help="print --out as a markdown table")
    args = ap.parse_args()
    if args.merge:
        return merge([Path(f) for f in args.merge], Path(args.out))
    if args.table:
        return print(table(__import__("json").loads(Path(args.out).read_text())))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("diffdistill").setLevel(logging.ERROR)
    names = args.objectives or sorted(OBJECTIVES)
    result: dict[str, Any] = {
        "benchmark": "toy_quality",
        "machine": machine_info("cpu"),
        "note": args.note,
        "protocol": {
            "recipes": "experiment=toy_gmm/<objective> (diffdistill/configs/experiment/toy_gmm/)",
            "overrides": args.set,
            "metric": f"sliced W2 (128 directions) of {args.num_eval} EMA samples vs as many exact ones, / floor; "
            "largest |mode mass - weight| (posterior assignment)",
            "one_step_bar": f"SW2 <= {ONE_STEP_BAR}x floor and mass error <= {MASS_BAR}",
            "two_step_bar": "SW2 <= the exact teacher's Heun-18 SW2",
            "two_step_sigmas": "[sigma_init, m sigma_data / 0.5], m in TWO_STEP_MIDS (the best is reported)",
            "two_step_mids": list(TWO_STEP_MIDS),
        },
        "mixtures": {},
        "runs": [],
    }
    cache: dict = {}
    out = Path(args.out)
    if args.update and out.exists():  # rows of other runs of this script (e.g. one process per mixture)
        import json

        old = json.loads(out.read_text())
        done = {(o, m) for o in names for m in args.mixtures}
        result["runs"] = [r for r in old["runs"] if (r["objective"], r["mixture"]) not in done]
        result["mixtures"] = {k: v for k, v in old["mixtures"].items()}
        result["earlier_runs_machine"] = old.get("machine")
    for mixture in args.mixtures:
        for name in names:
            try:
                row = run_one(name, mixture, args, cache)
            except Exception as e:  # noqa: BLE001 - one failing recipe is recorded, the others still run
                row = {"objective": name, "mixture": mixture, "error": f"{type(e).__name__}: {e}"}
                print(name, mixture, row["error"], flush=True)
            if mixture in cache:
                result["mixtures"][mixture] = cache[mixture][1]
            result["runs"].append(row)
            write_result(out, result)
    result["machine"] = finish_info(result["machine"])
    write_result(out, result)
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
