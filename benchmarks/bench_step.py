"""Cost of one training iteration of every registered objective, as a ratio to a plain denoising fine-tune step.

    python benchmarks/bench_step.py                       # all networks, all objectives, CPU
    python benchmarks/bench_step.py --networks fashion_mnist --objectives dmd cd --quick

For each network (``_common.NETWORKS``) and each objective in ``OBJECTIVES`` (so objectives added later are
measured without editing this file) plus a few named variants, the script builds the objective's roles from the
teacher exactly as ``diffdistill-train`` does (``build_roles`` / ``make_objective`` with the objective's
``configs/objective/<name>.yaml``), wraps them in a :class:`DistillTrainer` and times
``DistillTrainer.train_step()``: warm-up, then the median over repeats of one full update cycle (an iteration
for 1:1 objectives, ``r`` iterations for TTUR ``r``). The denominator is a plain EDM denoising fine-tune of the
same backbone at the same batch size (EDM loss forward + backward + clip + AdamW + EMA), run through the same
trainer in the same process: the reported ratio is the median over pairs of one objective update cycle
alternated with as many fine-tune iterations (robust to drifts of machine speed); the ratio to the fine-tune
timed alone before and after all objectives is kept beside it. Next to the measured ratio stands the
pass-count estimate ``objective.pass_count().cost() / 3`` (a fine-tune step is one forward with graph plus one
backward = 3 forwards), so the overhead beyond network passes is visible.

Peak memory per objective and mode: ``full`` (full copies of every role) and ``checkpointing``
(``trainer.gradient_checkpointing=true``: activation checkpointing in the trainable roles' networks).
Static = parameters, buffers, optimiser state, EMA and frozen copies (exact tensor bytes); step = what one
update cycle adds on top (CPU: peak RSS above the RSS before the cycle; CUDA: ``max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import math
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import (
    NETWORKS,
    RESULTS,
    ROOT,
    Network,
    PeakMemory,
    build_network,
    concurrent_runs,
    finish_info,
    machine_info,
    tensor_bytes,
    time_calls,
    write_result,
)
from omegaconf import OmegaConf

import diffdistill.objectives  # noqa: F401  (registers every objective)
from diffdistill.data.images import Batch
from diffdistill.models.generator import Generator
from diffdistill.objectives.base import OBJECTIVES, LossOutput, Objective, PassCount
from diffdistill.objectives.common import denoising_score_matching_loss
from diffdistill.training.builders import build_roles, make_objective
from diffdistill.training.optim import OptimizerSpec
from diffdistill.training.trainer import DistillTrainer, TrainerConfig

# Per-objective settings the benchmark must change from the paper defaults, and why.
OVERRIDES: dict[str, dict[str, Any]] = {
    "cd": {"distance": "l2"},
    "rcm": {"tangent_warmup_steps": 0},  # time the steady state (1 student : 4 critic), not the sCM-only warm-up
    "sida": {"images_per_step": 1},  # its switch-on points (0 images) count in images; the GAN is on from step 0
}
NOTES: dict[str, str] = {
    "cd": "distance=l2: the paper's LPIPS needs user-supplied VGG weights (never downloaded); LPIPS would add a "
    "VGG forward/backward at 224 px that the pass count does not include",
    "lcm": "schedule = configs/schedule/karras.yaml (1000 levels), skipping step 20, DDIM teacher step with CFG "
    "w ~ U[3, 15] (two teacher passes batched into one forward), guidance-embedded student",
    "scm": "sCD with autograd forward-mode JVP (torch.func.jvp, math SDPA kernel); pass count charges a JVP 3 "
    "forwards; tangent warm-up does not change the cost",
    "dmd": "DMD (v1 schedule 1:1 by default): generator fwd+bwd, teacher + fake fwd (no grad), fake fwd+bwd; the "
    "critic reuses the generator's samples of the same iteration; no GAN term",
    "ict": "consistency training: student fwd+bwd + stop-grad target fwd; teacher unused",
    "dmd2": "DMD2 5:1 with the GAN term, per iteration over a 5-iteration cycle: 1 generator step (G fwd+bwd, teacher "
    "+ fake fwd without grad, fake-score features fwd+bwd to the input for the GAN term) and 5 critic steps (one fake "
    "fwd+bwd gives the DSM loss and the generated half's taps, fuse_critic_passes; the real half's features fwd+bwd; "
    "4 of them regenerate G without grad). UNet features stop after the mid block",
    "rcm": "rCM after its warm-up, per iteration over a 5-iteration cycle: 1 student step (sCD term with autograd "
    "JVP + score regulariser on a backward-simulated sample of 1-4 student calls) and 4 critic steps (backward "
    "simulation without grad + fake fwd+bwd); the number of student calls cycles with the iteration",
    "ect": "consistency tuning: student fwd+bwd + stop-grad target fwd; teacher unused",
    "sid": "SiD 1:1: generator step = G fwd+bwd, teacher and fake fwd with a graph and their backward to the input "
    "(parameters frozen); fake step = G fwd (fresh noise, no grad) + fake fwd+bwd; student.sigma_init 80 as the other "
    "rows (the paper's 2.5 does not change the cost)",
    "sim": "SIM 1:1: generator step = G fwd+bwd, teacher fwd with a graph + its VJP, fake fwd without graph (y is "
    "detached); fake step as SiD",
    "sida": "SiDA 1:1 with the GAN term on: SiD's passes + fake-score features fwd+bwd to the input (generator step) "
    "and the real half's features fwd+bwd (critic step; the generated half's taps come with the fake loss's forward "
    "at the same sigma and noise)",
}
# Extra named configurations per network: (label, objective, overrides).
VARIANTS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "fashion_mnist": [
        ("dmd_cfg2", "dmd", {"real_guidance_scale": 2.0}),
        ("dmd_ttur5", "dmd", {"critic_steps_per_generator_step": 5}),
        ("scm_fd", "scm", {"jvp_backend": "finite_difference"}),
        ("sid_lsg2", "sid", {"real_guidance_scale": 2.0, "fake_guidance_scale": 2.0}),
        ("sid_ckpt_scores", "sid", {"checkpoint_scores": True}),
        ("sim_ckpt_scores", "sim", {"checkpoint_scores": True}),
    ],
    "sd_tiny": [],
    "adm_dmd2": [("dmd_ttur5", "dmd", {"critic_steps_per_generator_step": 5})],
}
PEER_ROW = {"sd_tiny": "lcm", "adm_dmd2": "dmd_ttur5"}
FINETUNE = "finetune"


class FinetuneEDM(Objective):
    """The denominator: a plain EDM denoising fine-tune of the student (Karras et al. 2022, log-normal sigma).

    Not registered: it is the reference step, not a distillation objective.
    """

    name = FINETUNE
    roles = ("generator",)
    requires_real_data = True

    def __init__(self, generator: Generator, P_mean: float = -1.2, P_std: float = 1.2):
        self.generator, self.P_mean, self.P_std = generator, P_mean, P_std

    def generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x0 = batch.x0
        sigma = (self.P_mean + self.P_std * torch.randn(x0.shape[0], device=x0.device)).exp()
        return LossOutput(denoising_score_matching_loss(self.generator.denoiser, x0, sigma, batch.cond, "edm"))

    def pass_count(self) -> PassCount:
        return PassCount(forward_grad=1.0, backward=1.0)


def objective_node(name: str, overrides: dict[str, Any]):
    """The objective's shipped config (``configs/objective/<name>.yaml``) with the benchmark's overrides."""
    path = ROOT / "diffdistill" / "configs" / "objective" / f"{name}.yaml"
    cls = OBJECTIVES[name]
    node = (
        OmegaConf.load(path)
        if path.exists()
        else OmegaConf.create({"_target_": f"{cls.__module__}.{cls.__qualname__}", "_partial_": True})
    )
    return OmegaConf.merge(node, OVERRIDES.get(name, {}), overrides)


def make_trainer(
    net: Network, objective: str | None, overrides: dict[str, Any], args, run_dir: str, mode: str = "full"
) -> DistillTrainer:
    """A trainer for ``objective`` (``None``: the fine-tune reference) on a fresh student copy of ``net.teacher``."""
    teacher = net.teacher
    lora = {"rank": args.lora_rank, "share_base": True} if mode == "lora" else None
    if lora is not None:
        teacher = copy.deepcopy(net.teacher)  # a shared-base student adapts the teacher's network in place
    if objective is None:
        if lora is not None:
            roles = build_roles(FinetuneEDM, teacher, OmegaConf.create({"sigma_init": 80.0, "lora": lora}))
            gen = roles["generator"]
        else:
            gen = Generator.from_teacher(teacher, 80.0)
            roles = {"generator": gen}
        obj: Objective = FinetuneEDM(gen)
    else:
        cls = OBJECTIVES[objective]
        student = OmegaConf.create({"denoiser": None, "sigma_init": 80.0, "sampling_sigmas": None, "lora": lora})
        roles = build_roles(cls, teacher, student)
        schedule = None
        if (ROOT / "diffdistill" / "configs" / "schedule" / "karras.yaml").exists():
            from hydra.utils import instantiate

            schedule = instantiate(OmegaConf.load(ROOT / "diffdistill" / "configs" / "schedule" / "karras.yaml"))
        obj = make_objective(objective_node(objective, overrides), cls, teacher, roles, schedule)
    tcfg = TrainerConfig(
        max_steps=10**9,
        batch_size=net.batch_size,
        grad_clip=10.0,
        ema_decays=[0.999],
        device=args.device,
        mixed_precision=args.mixed_precision,
        sample_every=0,
        checkpoint_every=0,
        channels_last=args.channels_last,
        compile=args.compile,
        seed=0,
        gradient_checkpointing=mode == "checkpointing",  # every trainable role's network that supports it
        tf32=getattr(args, "tf32", False),
    )
    optim = OptimizerSpec(lr=1e-6, warmup_steps=0, fused=args.fused)
    trainer = DistillTrainer(obj, roles, teacher, net.dataset, run_dir, tcfg, optim)
    if mode == "checkpointing" and not any(
        getattr(m, "is_gradient_checkpointing", False) for r in obj.roles for m in trainer.roles[r].modules()
    ):
        raise RuntimeError("no network in the trainable roles supports activation checkpointing")
    return trainer


def cycle(trainer: DistillTrainer) -> int:
    s = trainer.objective.update_schedule
    return max(1, int(s.critic_steps_per_generator_step))


def paired_ratio(obj_step, ref_step, group: int, warmup: int, repeats: int, device) -> dict[str, float]:
    """Alternate one update cycle of the objective with as many fine-tune iterations, ``repeats`` times; the
    median of the per-pair ratios is robust to slow drifts of the machine's speed (other processes, clocks)."""
    for _ in range(warmup):
        obj_step()
    ref_step()
    ratios, obj_ms, ref_ms = [], [], []
    for _ in range(repeats):
        t_ref = time_calls(ref_step, 0, 1, device, group=group)["median_ms"]
        t_obj = time_calls(obj_step, 0, 1, device, group=group)["median_ms"]
        ratios.append(t_obj / t_ref)
        obj_ms.append(t_obj)
        ref_ms.append(t_ref)
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "objective_ms_median": statistics.median(obj_ms),
        "finetune_ms_median": statistics.median(ref_ms),
        "pairs": repeats,
    }


def measure(
    net: Network,
    label: str,
    objective: str | None,
    overrides: dict[str, Any],
    args,
    mode: str,
    timing: bool,
    memory: bool,
    ref: DistillTrainer | None = None,
) -> dict[str, Any]:
    """Time and/or measure the memory of one (network, objective, mode) case in this process; with ``ref`` (a
    fine-tune trainer) also the paired ratio to it."""
    row: dict[str, Any] = {"label": label, "objective": objective or FINETUNE, "mode": mode}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(net, objective, overrides, args, tmp, mode)
        r = cycle(trainer)
        pc = trainer.objective.pass_count()
        row.update(
            pass_count={k: getattr(pc, k) for k in ("forward", "forward_grad", "backward", "jvp")},
            pass_cost=pc.cost(),
            update_cycle=r,
        )
        warm = r * math.ceil(args.warmup / r)
        if timing:
            row["time"] = time_calls(trainer.train_step, warm, args.repeats, trainer.device, group=r)
            if ref is not None:
                row["paired"] = paired_ratio(trainer.train_step, ref.train_step, r, 0, args.repeats, trainer.device)
        if memory:
            if not timing:
                for _ in range(r):
                    trainer.train_step()
            objs = [
                trainer.roles,
                trainer.optimizers,
                [e.module for e in trainer.emas.values()],
                trainer.teacher,
                trainer.objective.auxiliary_modules(),
            ]
            static = tensor_bytes(*objs)
            with PeakMemory(trainer.device) as pm:
                for _ in range(r):
                    trainer.train_step()
            row["memory_mib"] = {
                "static": round(static / 2**20, 2),
                "step_peak_above_static": None if pm.peak_mib is None else round(pm.peak_mib, 2),
            }
            if pm.peak_mib is not None:
                row["memory_mib"]["total_peak"] = round(static / 2**20 + pm.peak_mib, 2)
        row["skipped_updates"] = trainer.nonfinite["skipped"]
        del trainer
    gc.collect()
    return row


def mode_rows(net: Network, net_name: str, mode: str, args, ft_ms: float) -> list[dict[str, Any]]:
    """Time and memory of the fine-tune and every case in another memory ``mode`` (``checkpointing``: diffusers
    activation checkpointing; ``lora``: shared-base LoRA students), relative to the full fine-tune."""
    ck = copy.copy(args)
    ck.repeats = args.ckpt_repeats
    rows = [measure(net, FINETUNE, None, {}, ck, mode, timing=True, memory=args.memory)]
    for label, name, ov in cases(net_name, args.objectives):
        try:
            rows.append(measure(net, label, name, ov, ck, mode, timing=True, memory=args.memory))
        except Exception as e:  # noqa: BLE001  (a broken objective must not hide the others)
            rows.append({"label": label, "objective": name, "error": f"{type(e).__name__}: {e}"})
    for row in rows:
        if "time" in row:
            row["ms_per_iteration"] = round(row["time"]["median_ms"], 2)
            row["ratio_to_full_finetune"] = round(row["time"]["median_ms"] / ft_ms, 3)
            mem = row.get("memory_mib")
            print(f"  [{mode}] {row['label']}: {row['ms_per_iteration']:.1f} ms, mem {mem}", flush=True)
        if mode == "lora":
            row["lora"] = {"rank": args.lora_rank, "share_base": True, "targets": "every Linear/Conv2d"}
    return rows


def cases(net_name: str, wanted: list[str] | None) -> list[tuple[str, str, dict[str, Any]]]:
    out = [(name, name, {}) for name in sorted(OBJECTIVES)]
    out += [v for v in VARIANTS.get(net_name, [])]
    if wanted:
        out = [c for c in out if c[0] in wanted or c[1] in wanted]
    return out


def run_network(net_name: str, args) -> dict[str, Any]:
    net = build_network(net_name)
    print(f"== {net_name}: {net.description}, batch {net.batch_size}", flush=True)
    res: dict[str, Any] = {
        "network": net_name,
        "description": net.description,
        "batch_size": net.batch_size,
        "peer": net.peer,
        "objectives": [],
        "measured": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "load_average_at_start": list(os.getloadavg()),
            "torch_threads": torch.get_num_threads(),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "concurrent_runs": concurrent_runs(),
        },
    }
    base0 = measure(net, FINETUNE, None, {}, args, "full", timing=True, memory=args.memory)
    print(f"  finetune: {base0['time']['median_ms']:.1f} ms", flush=True)
    ref_dir = tempfile.TemporaryDirectory()
    ref = make_trainer(net, None, {}, args, ref_dir.name)
    for _ in range(args.warmup):
        ref.train_step()
    rows = []
    for label, name, ov in cases(net_name, args.objectives):
        try:
            row = measure(net, label, name, ov, args, "full", timing=True, memory=args.memory, ref=ref)
        except Exception as e:  # noqa: BLE001  (a broken objective must not hide the others)
            rows.append({"label": label, "objective": name, "error": f"{type(e).__name__}: {e}"})
            print(f"  {label}: FAILED {e}", flush=True)
            continue
        row["overrides"] = {**OVERRIDES.get(name, {}), **ov}
        if name in NOTES:
            row["note"] = NOTES[name]
        rows.append(row)
        print(
            f"  {label}: {row['time']['median_ms']:.1f} ms (x{row['update_cycle']} cycle), paired ratio "
            f"{row['paired']['ratio_median']:.3f}, pass cost {row['pass_cost']:.2f}, mem {row.get('memory_mib')}",
            flush=True,
        )
    del ref
    ref_dir.cleanup()
    base1 = measure(net, FINETUNE, None, {}, args, "full", timing=True, memory=False)
    ft_ms = 0.5 * (base0["time"]["median_ms"] + base1["time"]["median_ms"])
    t0, t1 = base0["time"]["median_ms"], base1["time"]["median_ms"]
    res["finetune"] = {
        "ms_before": round(t0, 2),
        "ms_after": round(t1, 2),
        "ms": round(ft_ms, 2),
        "pass_cost": base0["pass_cost"],
        "memory_mib": base0.get("memory_mib"),
        "drift": round(t1 / t0 - 1, 3),
    }
    for row in rows:
        if "time" in row:
            row["ms_per_iteration"] = round(row["time"]["median_ms"], 2)
            row["ratio_to_finetune_before_after"] = round(row["time"]["median_ms"] / ft_ms, 3)
            row["measured_ratio"] = round(row["paired"]["ratio_median"], 3)
            row["estimate_ratio"] = round(row["pass_cost"] / base0["pass_cost"], 3)
            row["overhead_beyond_passes"] = round(row["measured_ratio"] / row["estimate_ratio"] - 1, 3)
    for mode, wanted in (("checkpointing", args.checkpointing), ("lora", args.lora)):
        if wanted:
            res[mode] = mode_rows(net, net_name, mode, args, ft_ms)
    res["objectives"] = rows
    res["measured"]["load_average_at_end"] = list(os.getloadavg())
    if net.peer and PEER_ROW.get(net_name):
        ours = next((r for r in rows if r["label"] == PEER_ROW[net_name] and "measured_ratio" in r), None)
        res["peer_comparison"] = {
            "peer": net.peer,
            "diffdistill_row": PEER_ROW[net_name],
            "diffdistill_ratio": ours and ours["measured_ratio"],
            "diffdistill_estimate": ours and ours["estimate_ratio"],
        }
    return res


SPEED_OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "fused_optimizer": {"fused": True},  # optim.fused: fused kernels on CUDA, foreach on CPU
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
}


def teacher_inference_mode(net: Network, repeats: int) -> dict[str, Any]:
    """A no-grad teacher forward under ``torch.no_grad`` vs ``torch.inference_mode`` (same numbers)."""
    t = net.teacher
    batch = net.dataset.get(torch.arange(net.batch_size))
    x, sigma = batch.x0, torch.full((net.batch_size,), 1.0)
    out = {}
    for label, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):

        def fwd(ctx=ctx):
            with ctx():
                return t(x, sigma, batch.cond)

        out[label + "_ms"] = round(time_calls(fwd, 2, repeats)["median_ms"], 2)
    with torch.no_grad():
        a = t(x, sigma, batch.cond)
    with torch.inference_mode():
        b = t(x, sigma, batch.cond)
    out["identical_outputs"] = bool(torch.equal(a, b))
    return out


def speed_study(args) -> dict[str, Any]:
    """Opt-in speed options of the trainer / optimiser, before vs after, on the Fashion-MNIST network."""
    net = build_network("fashion_mnist")
    rows = []
    options = [o for o in SPEED_OPTIONS if o != "compile" or args.study_compile]
    for label, name in (("finetune", None), ("dmd", "dmd"), ("cd", "cd")):
        for opt in options:
            a = copy.copy(args)
            for k, v in SPEED_OPTIONS[opt].items():
                setattr(a, k, v)
            try:
                row = measure(net, label, name, {}, a, "full", timing=True, memory=False)
            except Exception as e:  # noqa: BLE001
                rows.append({"label": label, "option": opt, "error": f"{type(e).__name__}: {e}"})
                continue
            rows.append(
                {
                    "label": label,
                    "option": opt,
                    "ms_per_iteration": round(row["time"]["median_ms"], 2),
                    "first_call_ms": round(row["time"]["first_call_ms"], 1),
                }
            )
            print(
                f"  [speed] {label} {opt}: {rows[-1]['ms_per_iteration']} ms (first {rows[-1]['first_call_ms']})",
                flush=True,
            )
    for row in rows:
        ref = next(
            (r for r in rows if r["label"] == row["label"] and r["option"] == "default" and "ms_per_iteration" in r),
            None,
        )
        if ref and "ms_per_iteration" in row:
            row["speedup_vs_default"] = round(ref["ms_per_iteration"] / row["ms_per_iteration"], 3)
    return {
        "network": net.name,
        "batch_size": net.batch_size,
        "rows": rows,
        "teacher_forward": teacher_inference_mode(net, args.repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=NETWORKS)
    ap.add_argument("--objectives", nargs="+", default=None, help="labels or registry names (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mixed-precision", default="no", help="accelerate mixed precision (GPU: bf16)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--fused", action="store_true", help="optim.fused (foreach on CPU)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--tf32", action="store_true", help="trainer.tf32 (CUDA only)")
    ap.add_argument("--ckpt-repeats", type=int, default=3, help="repeats of the checkpointing/LoRA-mode timings")
    ap.add_argument("--no-lora", dest="lora", action="store_false", help="skip the shared-base LoRA mode")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--speed-study", action="store_true", help="time the opt-in speed options (Fashion-MNIST)")
    ap.add_argument("--study-compile", action="store_true", help="include torch.compile in the speed study")
    ap.add_argument("--quick", action="store_true", help="1 warm-up, 2 repeats (smoke run)")
    ap.add_argument("--note", default="")
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the other networks (and speed study) of an existing --out file, replace these",
    )
    ap.add_argument("--out", default=str(RESULTS / "step_cost_cpu.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.warmup, args.repeats = 1, 2
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("diffdistill").setLevel(logging.ERROR)
    info = machine_info(args.device)
    result: dict[str, Any] = {
        "benchmark": "step_cost",
        "machine": info,
        "note": args.note,
        "settings": {
            "warmup_iterations": args.warmup,
            "repeats": args.repeats,
            "statistic": "median over repeats of the mean iteration time of one update cycle",
            "optimizer": "AdamW (lr 1e-6), clip 10, one EMA track 0.999",
            "fused": args.fused,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "tf32": args.tf32,
            "mixed_precision": args.mixed_precision,
            "finetune_reference": "EDM loss (log-normal sigma, P_mean -1.2, P_std 1.2), same trainer",
            "estimate": "pass_count().cost() / 3 (F = 1 forward, backward = 2F, JVP = 3F)",
        },
        "registry": sorted(OBJECTIVES),
        "networks": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():
        old = json.loads(out.read_text())
        result["networks"] = [n for n in old.get("networks", []) if n["network"] not in args.networks]
        if "speed_options" in old and not args.speed_study:
            result["speed_options"] = old["speed_options"]
        result["machine_of_kept_entries"] = old.get("machine")
    for name in args.networks:
        result["networks"].append(run_network(name, copy.copy(args)))
        write_result(out, result)  # partial results survive an interruption
    if args.speed_study:
        result["speed_options"] = speed_study(copy.copy(args))
    finish_info(info)
    print(f"wrote {write_result(out, result)}")


if __name__ == "__main__":
    main()
