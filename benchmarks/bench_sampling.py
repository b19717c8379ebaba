"""Sampling speed: images/s of every objective's one-step and few-step student against the teacher's default sampler.

    python benchmarks/bench_sampling.py [--batch 64] [--out benchmarks/results/sampling_cpu.json]

Network: the packaged Fashion-MNIST teacher architecture (``configs/teacher.yaml``, random weights: speed does
not depend on the weights). The teacher runs EDM Heun with 18 steps (35 network evaluations), without CFG and
with CFG ``w = 2`` (conditional and unconditional passes batched into one forward of twice the batch). Each
student is built the way ``diffdistill-train`` builds it for that objective (``build_roles`` +
``make_objective``: CD/LCM wrap the boundary condition, LCM adds its guidance embedding, sCM its adaptive
weight), then sampled in one step and with consistency multistep sampling in 2 and 4 steps. Times cover the
network evaluations and sampler arithmetic on a batch of pre-drawn noise (no image encoding).
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import torch
from _common import RESULTS, build_network, count_params, finish_info, machine_info, time_calls, write_result
from omegaconf import OmegaConf

import diffdistill.objectives  # noqa: F401  (registers every objective)
from diffdistill.models.conditioning import Conditioning
from diffdistill.objectives.base import OBJECTIVES
from diffdistill.sampling import heun_sample, multistep_sample
from diffdistill.schedules.karras import karras_sigmas

FEW_STEP_SIGMAS = {2: [80.0, 0.8], 4: [80.0, 2.0, 0.5, 0.1]}  # consistency multistep sigmas (CM-style)


def student_for(name: str, teacher) -> torch.nn.Module:
    """The generator role of objective ``name`` as training builds it (random teacher weights)."""
    from bench_step import objective_node

    from diffdistill.training.builders import build_roles, make_objective

    cls = OBJECTIVES[name]
    roles = build_roles(cls, teacher, OmegaConf.create({"denoiser": None, "sigma_init": 80.0, "sampling_sigmas": None}))
    make_objective(objective_node(name, {}), cls, teacher, roles, None)
    return roles["generator"].eval()


def rate(fn, n: int, warmup: int, repeats: int) -> dict[str, float]:
    t = time_calls(fn, warmup, repeats)
    return {"images_per_s": round(n / (t["median_ms"] / 1000.0), 2), "ms_per_batch": round(t["median_ms"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heun-steps", type=int, default=18)
    ap.add_argument("--cfg", type=float, default=2.0, help="CFG scale of the guided teacher row")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=str(RESULTS / "sampling_cpu.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.repeats, args.heun_steps = 8, 1, 3
    warnings.filterwarnings("ignore")
    info = machine_info("cpu")
    net = build_network("fashion_mnist")
    teacher = net.teacher
    n = args.batch
    z = torch.randn(n, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(class_labels=torch.arange(n) % 10)
    rows: list[dict[str, Any]] = []
    sig = karras_sigmas(args.heun_steps, teacher.sigma_min, teacher.sigma_max, append_zero=True)
    nfe = 2 * args.heun_steps - 1
    with torch.inference_mode():
        for w in (1.0, args.cfg):
            teacher.guidance_scale = w
            r = rate(lambda: heun_sample(teacher, z * sig[0], sig, cond), n, args.warmup, args.repeats)
            rows.append(
                {
                    "model": "teacher",
                    "sampler": f"Heun {args.heun_steps} steps",
                    "nfe": nfe,
                    "guidance_scale": w,
                    "forward_batch": n if w == 1.0 else 2 * n,
                    **r,
                }
            )
            print(rows[-1], flush=True)
        teacher.guidance_scale = 1.0
        for name in sorted(OBJECTIVES):
            gen = student_for(name, teacher)
            r = rate(lambda gen=gen: gen(z, cond), n, args.warmup, args.repeats)
            rows.append({"model": f"{name} student", "sampler": "one step", "nfe": 1, **r})
            print(rows[-1], flush=True)
            for k, sigmas in FEW_STEP_SIGMAS.items():
                noise = [torch.randn_like(z) for _ in sigmas[1:]]
                r = rate(
                    lambda gen=gen, sigmas=sigmas, noise=noise: multistep_sample(
                        gen.denoise, z, sigmas, cond, noise=noise, sigma_min=gen.renoise_floor
                    ),
                    n,
                    args.warmup,
                    args.repeats,
                )
                rows.append(
                    {
                        "model": f"{name} student",
                        "sampler": f"consistency multistep {k} steps",
                        "nfe": k,
                        "sigmas": sigmas,
                        **r,
                    }
                )
                print(rows[-1], flush=True)
    ref = {
        w: next(r["images_per_s"] for r in rows if r["model"] == "teacher" and r["guidance_scale"] == w)
        for w in (1.0, args.cfg)
    }
    for r in rows:
        if r["model"] != "teacher":
            r["speedup_vs_teacher"] = round(r["images_per_s"] / ref[1.0], 1)
            r["speedup_vs_teacher_cfg"] = round(r["images_per_s"] / ref[args.cfg], 1)
    result = {
        "benchmark": "sampling",
        "machine": finish_info(info),
        "note": args.note,
        "network": net.description,
        "parameters": count_params(teacher),
        "batch_size": n,
        "teacher_sampler": f"EDM Heun, {args.heun_steps} steps ({nfe} NFE), karras sigmas (0.002, 80, rho 7)",
        "rows": rows,
    }
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
