"""Quality per unit of compute on the 2-D Gaussian-mixture toy, for every objective that runs on it.

    python benchmarks/bench_toy_quality.py [--iters 1500] [--out benchmarks/results/toy_quality.json]

Setup (``data=toy_gmm``: 8 Gaussians, radius 2, std 0.1; ``backbone=analytic``: the exact mixture denoiser as
teacher): each objective in ``OBJECTIVES`` is composed from the shipped Hydra configs with a residual-MLP student
(``diffdistill.models.builders.edm_mlp``, 3 blocks of 128, ``sigma_data`` of the mixture) and trained for the same
number of iterations at batch 256 with AdamW (lr 1e-3, no weight decay). Real students start from the teacher's
weights; the analytic teacher has none, so every network role (generator, EMA target, DMD's fake score) starts
from one diffusion MLP pretrained on the toy by EDM denoising (``--init pretrained``, shared, excluded from the
timings; ``--init random`` for training from scratch). Every ``--eval-every`` iterations the one-step samples of
the EMA generator (decay 0.99) and of the online generator from a fixed set of noise are compared with true
samples by the sliced Wasserstein-2 distance (128 fixed random directions, 16384 points). The JSON records the
distance against iterations, network passes and training wall time (``train_step`` only, evaluation excluded);
the PNG plots the EMA curves. References: the analytic teacher's Heun sampler (18 steps, 35 evaluations) on the
same noise, the pretrained MLP's own Heun and one-step samples, and the floor of two independent true sets.

Objective settings that must change for a toy run of this length (paper schedules assume 10^5 iterations) are in
``toy_overrides``; objectives added later run with their shipped config, and a failure is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, finish_info, machine_info, write_result
from omegaconf import OmegaConf, open_dict

import diffdistill.objectives  # noqa: F401  (registers every objective)
from diffdistill.evaluation.toy import sliced_w2
from diffdistill.models.conditioning import Conditioning
from diffdistill.objectives.base import OBJECTIVES


def toy_overrides(iters: int, sigma_data: float = 0.5) -> dict[str, dict[str, Any]]:
    """Settings scaled to a short toy run (the paper defaults are schedules over 10^5+ iterations).

    The log-normal noise densities of iCT, ECT and sCM (``P_mean``) are set for image data with
    ``sigma_data = 0.5``; on data with another ``sigma_data`` the same ``P_mean`` puts the mass at a different
    signal-to-noise ratio (for the mixture, sigma_d = 1.42, sCM's t would sit near 0.25 rad and never near the
    one-step sampler's pi/2). ``P_mean`` is shifted by ``ln(sigma_data / 0.5)``, which is what rescaling the data
    to ``sigma_data = 0.5`` would do.
    """
    shift = math.log(sigma_data / 0.5)
    return {
        "dmd": {"critic_steps_per_generator_step": 5},  # DMD2 TTUR: the fake score must track the generator
        "cd": {"distance": "l2"},  # LPIPS is for images
        "lcm": {"distance": "l2"},
        "ict": {"total_steps": iters, "P_mean": -1.1 + shift},  # curriculum N = 11 ... 1281 over the run
        "ect": {"double_every": max(1, iters // 4), "P_mean": -1.1 + shift},  # four stages of r(t) over the run
        "scm": {"tangent_warmup_steps": max(1, iters // 10), "P_mean": -1.0 + shift},
        "rcm": {"tangent_warmup_steps": max(1, iters // 10), "P_mean": -1.0 + shift},
    }


NOTES = {
    "dmd": "fake score: a randomly initialised MLP of the student's shape (an analytic teacher cannot be copied into "
    "a trainable fake score); critic 5 : generator 1",
    "ect": "ECT tunes a pretrained diffusion model: here the pretrained diffusion MLP",
    "ict": "consistency training; like every objective here it starts from the pretrained diffusion MLP "
    "(--init random: from scratch, iCT's own setting)",
}


def compose(name: str, iters: int, batch: int, lr: float, seed: int, sigma_data: float = 0.5):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffdistill.cli.common import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(
            "train",
            overrides=[
                "~experiment",
                "backbone=analytic",
                "data=toy_gmm",
                f"objective={name}",
                "schedule=toy",
                "trainer.device=cpu",
                "eval=none",
            ],
        )
    with open_dict(cfg):
        cfg.objective = OmegaConf.merge(cfg.objective, toy_overrides(iters, sigma_data).get(name, {}))
        cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.trainer.seed = iters, batch, seed
        cfg.trainer.ema_decays, cfg.trainer.sample_every, cfg.trainer.checkpoint_every = [0.99], 0, 0
        cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay = lr, 10, 0.0
        cfg.run_dir = "unused"
    return cfg


FOURIER_SCALE = 1.0  # set from --fourier-scale


def mlp_config(sigma_data: float) -> dict[str, Any]:
    return {
        "_target_": "diffdistill.models.builders.edm_mlp",
        "dim": 2,
        "hidden": 128,
        "depth": 3,
        "sigma_data": sigma_data,
        "fourier_scale": FOURIER_SCALE,
    }


def pretrain_mlp(dataset, sigma_data: float, iters: int, seed: int = 0):
    """A diffusion MLP trained by EDM denoising on true samples: the student's initialisation, as a real teacher's
    weights initialise real students (the analytic teacher has no weights to copy). Excluded from the timings."""
    from hydra.utils import instantiate

    from diffdistill.objectives.common import denoising_score_matching_loss

    torch.manual_seed(seed)
    den = instantiate(OmegaConf.create(mlp_config(sigma_data)))
    opt = torch.optim.Adam(den.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    for it in range(iters):
        x0 = dataset.get(torch.arange(it * 512, (it + 1) * 512)).x0
        sigma = (-1.2 + 1.2 * torch.randn(512)).exp()
        loss = denoising_score_matching_loss(den, x0, sigma, Conditioning()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return den.eval().requires_grad_(False)


def build(cfg, run_dir: str, init=None):
    """Like ``build_trainer``, but every network role starts from ``init`` (the pretrained diffusion MLP) where a
    real run would copy the teacher, or from random weights when ``init`` is ``None``."""
    import copy

    from hydra.utils import instantiate

    from diffdistill.models.generator import FakeScore
    from diffdistill.training.builders import build_roles, build_teacher, make_objective, objective_class
    from diffdistill.training.checkpoint import seed_everything
    from diffdistill.training.trainer import DistillTrainer

    seed_everything(int(cfg.trainer.seed))
    dataset = instantiate(cfg.data)
    teacher = build_teacher(cfg.backbone, dataset)
    with open_dict(cfg):
        cfg.student.denoiser = mlp_config(float(teacher.sigma_data))
    cls = objective_class(cfg.objective)
    roles = build_roles(cls, teacher, cfg.student)
    for r, m in list(roles.items()):
        if r == "fake_score":  # an analytic teacher cannot be copied into a trainable fake score
            roles[r] = FakeScore(copy.deepcopy(init) if init is not None else instantiate(cfg.student.denoiser))
            roles[r].requires_grad_(True)
        elif init is not None and hasattr(m, "denoiser"):
            m.denoiser.load_state_dict(init.state_dict())
    obj = make_objective(cfg.objective, cls, teacher, roles, instantiate(cfg.schedule))
    trainer = DistillTrainer(obj, roles, teacher, dataset, run_dir, instantiate(cfg.trainer), instantiate(cfg.optim))
    return trainer, dataset, teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--num-eval", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--objectives", nargs="+", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fourier-scale", type=float, default=1.0, help="Fourier scale of the MLP's time embedding")
    ap.add_argument(
        "--init",
        choices=("pretrained", "random"),
        default="pretrained",
        help="student init: a diffusion MLP pretrained on the toy (a teacher copy's stand-in) or random",
    )
    ap.add_argument("--pretrain-iters", type=int, default=3000)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=str(RESULTS / "toy_quality.json"))
    args = ap.parse_args()
    global FOURIER_SCALE
    FOURIER_SCALE = args.fourier_scale
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("diffdistill").setLevel(logging.ERROR)
    info = machine_info("cpu")
    from diffdistill.sampling import heun_sample
    from diffdistill.schedules.karras import karras_sigmas

    g = torch.Generator().manual_seed(1234)
    dirs = torch.randn(128, 2, generator=g)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    z = torch.randn(args.num_eval, 2, generator=g)
    names = args.objectives or sorted(OBJECTIVES)
    cfg0 = compose(names[0], args.iters, args.batch, args.lr, args.seed)
    dataset = __import__("hydra.utils", fromlist=["instantiate"]).instantiate(cfg0.data)
    teacher_den = dataset.teacher()
    true_a, _ = teacher_den.sample(args.num_eval, torch.Generator().manual_seed(1))
    true_b, _ = teacher_den.sample(args.num_eval, torch.Generator().manual_seed(2))
    sig = karras_sigmas(18, teacher_den.sigma_min, teacher_den.sigma_max, append_zero=True)
    teacher_x = heun_sample(teacher_den, z * sig[0], sig, Conditioning())
    refs = {
        "true_vs_true_floor": sliced_w2(true_a, true_b, directions=dirs),
        "teacher_heun18": sliced_w2(teacher_x, true_a, directions=dirs),
        "noise_prior_at_sigma_data": sliced_w2(z * teacher_den.sigma_data, true_a, directions=dirs),
    }
    init = None
    if args.init == "pretrained":
        t0 = time.perf_counter()
        init = pretrain_mlp(dataset, float(teacher_den.sigma_data), args.pretrain_iters, args.seed)
        refs["init_mlp_heun18"] = sliced_w2(heun_sample(init, z * sig[0], sig, Conditioning()), true_a, directions=dirs)
        refs["init_mlp_one_step"] = sliced_w2(init(z * sig[0], sig[0].float().expand(len(z))), true_a, directions=dirs)
        pretrain_s = time.perf_counter() - t0
    print(refs, flush=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        sd = float(teacher_den.sigma_data)
        cfg = compose(name, args.iters, args.batch, args.lr, args.seed, sd)
        row: dict[str, Any] = {
            "objective": name,
            "overrides": toy_overrides(args.iters, sd).get(name, {}),
            "note": NOTES.get(name, ""),
        }
        try:
            with tempfile.TemporaryDirectory() as tmp:
                trainer, _, _ = build(cfg, tmp, init)
                row["pass_cost_per_iteration"] = trainer.objective.pass_count().cost()
                curve, train_s = [], 0.0

                def evaluate(it: int, train_s: float, trainer=trainer, curve=curve, row=row) -> None:
                    with torch.no_grad(), torch.random.fork_rng():
                        gen = trainer.accelerator.unwrap_model(trainer.roles["generator"])
                        ema = trainer.ema_generator()
                        x_on, x_ema = gen(z), ema(z)
                    d_on, d_ema = sliced_w2(x_on, true_a, directions=dirs), sliced_w2(x_ema, true_a, directions=dirs)
                    curve.append(
                        {
                            "iteration": it,
                            "train_seconds": round(train_s, 3),
                            "network_passes": round(it * row["pass_cost_per_iteration"], 1),
                            "sw2_ema": round(d_ema, 5) if math.isfinite(d_ema) else None,
                            "sw2_online": round(d_on, 5) if math.isfinite(d_on) else None,
                        }
                    )

                evaluate(0, 0.0)
                for it in range(1, args.iters + 1):
                    t0 = time.perf_counter()
                    trainer.train_step()
                    train_s += time.perf_counter() - t0
                    if it % args.eval_every == 0 or it == args.iters:
                        evaluate(it, train_s)
                row.update(
                    curve=curve,
                    train_seconds=round(train_s, 2),
                    ms_per_iteration=round(1000 * train_s / args.iters, 3),
                    final_sw2_ema=curve[-1]["sw2_ema"],
                    final_sw2_online=curve[-1]["sw2_online"],
                    best_sw2_ema=min((c["sw2_ema"] for c in curve if c["sw2_ema"] is not None), default=None),
                    skipped_updates=trainer.nonfinite["skipped"],
                )
                print(f"{name}: final SW2 (EMA) {row['final_sw2_ema']}, {row['ms_per_iteration']} ms/it", flush=True)
        except Exception as e:  # noqa: BLE001  (an objective that cannot run on the toy is reported, not fatal)
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"{name}: cannot run on the toy: {row['error']}", flush=True)
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "toy_quality",
        "machine": finish_info(info),
        "note": args.note,
        "setup": {
            "data": "toy_gmm (8 Gaussians on a circle of radius 2, std 0.1, 2-D)",
            "teacher": "analytic mixture denoiser",
            "student": mlp_config(float(teacher_den.sigma_data)),
            "iterations": args.iters,
            "batch_size": args.batch,
            "optimizer": f"AdamW lr {args.lr}, wd 0",
            "metric": f"sliced Wasserstein-2, 128 directions, {args.num_eval} one-step samples vs true samples",
            "ema_decay": 0.99,
            "torch_threads": torch.get_num_threads(),
            "init": args.init
            if init is None
            else f"pretrained diffusion MLP ({args.pretrain_iters} EDM "
            f"iterations, batch 512, Adam 1e-3 cosine, {pretrain_s:.1f} s, excluded from the timings)",
        },
        "references": {k: round(v, 5) for k, v in refs.items()},
        "objectives": rows,
    }
    write_result(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for row in result["objectives"]:
        if "curve" not in row:
            continue
        pts = [c for c in row["curve"] if c["sw2_ema"] is not None]
        for ax, key in zip(axes, ("iteration", "train_seconds")):
            ax.plot([c[key] for c in pts], [c["sw2_ema"] for c in pts], marker=".", label=row["objective"])
    refs = result["references"]
    for ax in axes:
        ax.axhline(refs["teacher_heun18"], color="k", ls="--", lw=1, label="teacher Heun 18 (35 NFE)")
        ax.axhline(refs["true_vs_true_floor"], color="gray", ls=":", lw=1, label="true vs true (floor)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("training iterations")
    axes[1].set_xlabel("training wall time [s] (CPU, train_step only)")
    axes[0].set_ylabel("sliced W2 of one-step samples (EMA) to the true mixture")
    axes[1].legend(fontsize=8)
    fig.suptitle("2-D Gaussian mixture (8 modes), analytic teacher, MLP student: quality per unit of compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
