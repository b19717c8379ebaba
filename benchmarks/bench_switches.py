"""The trainer's memory and speed switches, each before/after on the same network, batch and objective.

    OMP_NUM_THREADS=1 python benchmarks/bench_switches.py                 # CPU, writes results/switches_cpu.json
    python benchmarks/bench_switches.py --device cuda --mixed-precision bf16 --out $OUT/switches_cuda.json

Rows (``diffdistill/training/switches.py``, ``trainer.*`` keys):

* ``gradient_checkpointing``: ``trainer.gradient_checkpointing=false`` vs ``true`` on the Fashion-MNIST UNet
  (``_common.NETWORKS``), per objective: ms per iteration and peak step memory (``bench_step.measure``).
* ``fused_ema``: one EMA update of the generator, a loop of ``lerp_`` vs one ``torch._foreach_lerp_``, on the
  Fashion-MNIST UNet (1.06M parameters) and DMD2's ADM network (4.63M).
* ``compile``: ``trainer.compile=false`` vs ``[generator]`` (only the student compiled) on the 16-d Gaussian toy
  with a residual-MLP student (inductor compiles the UNet for more than 10 minutes on 2 CPU cores).
* ``tf32`` and ``channels_last``: measured on CUDA only; on CPU recorded as not applicable, with the reason.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from types import SimpleNamespace
from typing import Any

import torch
from _common import RESULTS, build_network, finish_info, machine_info, time_calls, write_result
from bench_step import cycle, make_trainer, measure, paired_ratio

from diffdistill.models.generator import Generator
from diffdistill.training.ema import EMA

CHECKPOINT_CASES = [("finetune", None), ("dmd", "dmd"), ("sid", "sid"), ("cd", "cd")]


def step_args(args, **switches) -> SimpleNamespace:
    """The options ``bench_step.make_trainer`` reads, with ``switches`` set."""
    base = dict(
        device=args.device,
        mixed_precision=args.mixed_precision,
        warmup=args.warmup,
        repeats=args.repeats,
        fused=False,
        channels_last=False,
        compile=False,
        tf32=False,
        lora_rank=16,
    )
    return SimpleNamespace(**{**base, **switches})


def row(net, label: str, objective: str | None, args, mode: str = "full", memory: bool = True, **switches):
    try:
        r = measure(net, label, objective, {}, step_args(args, **switches), mode, timing=True, memory=memory)
    except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
        return {"error": f"{type(e).__name__}: {e}"}
    out = {"ms_per_iteration": round(r["time"]["median_ms"], 2), "first_call_ms": round(r["time"]["first_call_ms"], 1)}
    if "memory_mib" in r:
        out["memory_mib"] = r["memory_mib"]
    return out


def checkpointing_rows(args) -> dict[str, Any]:
    """Time as the median ratio over alternated (on, off) pairs of update cycles (robust to the machine's drifts),
    step memory from one cycle of each in a fresh trainer."""
    net = build_network("fashion_mnist")
    rows = []
    for label, name in CHECKPOINT_CASES:
        a = step_args(args)
        entry: dict[str, Any] = {"objective": label}
        try:
            mem = {m: measure(net, label, name, {}, a, m, timing=False, memory=True) for m in ("full", "checkpointing")}
            with tempfile.TemporaryDirectory() as d_off, tempfile.TemporaryDirectory() as d_on:
                off, on = (
                    make_trainer(net, name, {}, a, d_off, "full"),
                    make_trainer(net, name, {}, a, d_on, "checkpointing"),
                )
                p = paired_ratio(on.train_step, off.train_step, cycle(off), args.warmup, args.repeats, off.device)
                del off, on
        except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
            rows.append({**entry, "error": f"{type(e).__name__}: {e}"})
            continue
        entry["off"] = {"ms_per_iteration": round(p["finetune_ms_median"], 2), "memory_mib": mem["full"]["memory_mib"]}
        entry["on"] = {
            "ms_per_iteration": round(p["objective_ms_median"], 2),
            "memory_mib": mem["checkpointing"]["memory_mib"],
        }
        entry["time_ratio_on_off"] = round(p["ratio_median"], 3)
        entry["time_ratio_range"] = [round(p["ratio_min"], 3), round(p["ratio_max"], 3)]
        pb = entry["off"]["memory_mib"].get("step_peak_above_static")
        pa = entry["on"]["memory_mib"].get("step_peak_above_static")
        if pb and pa:
            entry["step_memory_ratio_on_off"] = round(pa / pb, 3)
        print(
            f"  [checkpointing] {label}: time x{entry.get('time_ratio_on_off')}, "
            f"step memory x{entry.get('step_memory_ratio_on_off')}",
            flush=True,
        )
        rows.append(entry)
    return {
        "switch": "trainer.gradient_checkpointing",
        "network": net.name,
        "batch_size": net.batch_size,
        "timing": "median over alternated (on, off) pairs of one update cycle each",
        "rows": rows,
    }


def ema_rows(args) -> dict[str, Any]:
    rows = []
    device = torch.device(args.device)
    for name in ("fashion_mnist", "adm_dmd2"):
        net = build_network(name)
        gen = Generator.from_teacher(net.teacher, 80.0).to(device)
        n_params = sum(p.numel() for p in gen.parameters())
        n_tensors = sum(1 for _ in gen.parameters())
        entry: dict[str, Any] = {"network": name, "parameters": n_params, "tensors": n_tensors}
        tracks = {}
        for fused in (False, True):
            ema = EMA(gen, 0.999, fused=fused)
            t = time_calls(lambda ema=ema, gen=gen: ema.update(gen), 5, args.ema_repeats, device, group=20)
            entry["fused" if fused else "loop"] = {"ms_per_update": round(t["median_ms"], 4)}
            tracks[fused] = ema
        same = all(
            torch.equal(a, b) for a, b in zip(tracks[False].module.parameters(), tracks[True].module.parameters())
        )
        entry["identical_tracks"] = same
        entry["speedup"] = round(entry["loop"]["ms_per_update"] / entry["fused"]["ms_per_update"], 2)
        print(f"  [ema] {name}: loop {entry['loop']}, fused {entry['fused']}, x{entry['speedup']}", flush=True)
        rows.append(entry)
    return {"switch": "EMA.fused (default on)", "rows": rows}


def compile_rows(args) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from diffdistill.cli.common import compose_config
    from diffdistill.training.builders import build_trainer

    student = OmegaConf.to_yaml(
        {
            "_target_": "diffdistill.models.denoiser.EDMDenoiser",
            "sigma_data": 0.5,
            "net": {"_target_": "diffdistill.models.backbones.MLPBackbone", "dim": 16, "hidden": 256, "depth": 4},
        }
    )
    out = {}
    for label, value in (("off", "false"), ("generator", "[generator]")):
        with tempfile.TemporaryDirectory() as tmp:
            over = ["experiment=toy/dmd", f"run_dir={tmp}", "trainer.device=cpu", f"trainer.compile={value}"]
            over += ["trainer.sample_every=0", "trainer.checkpoint_every=0", "trainer.max_steps=100000"]
            cfg = compose_config(over)
            cfg.student.denoiser = OmegaConf.create(student)
            try:
                trainer = build_trainer(cfg)
                t = time_calls(trainer.train_step, 5, args.repeats, "cpu", group=20)
                out[label] = {
                    "ms_per_iteration": round(t["median_ms"], 3),
                    "first_call_ms": round(t["first_call_ms"], 1),
                }
            except Exception as e:  # noqa: BLE001
                out[label] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  [compile] {label}: {out[label]}", flush=True)
    if "ms_per_iteration" in out.get("off", {}) and "ms_per_iteration" in out.get("generator", {}):
        out["speedup"] = round(out["off"]["ms_per_iteration"] / out["generator"]["ms_per_iteration"], 3)
    return {
        "switch": "trainer.compile (per role)",
        "setup": "toy/dmd (16-d Gaussian, analytic teacher and fake score), residual MLP student 4x256, batch 256",
        "rows": out,
    }


def cuda_only_rows(args) -> dict[str, Any]:
    """TF32 and channels-last: before/after on CUDA; on CPU not applicable, with the reason."""
    if args.device != "cuda":
        return {
            "tf32": {
                "switch": "trainer.tf32",
                "applicable": False,
                "reason": "TF32 is a tensor-core format of NVIDIA GPUs (Ampere+); on CPU fp32 matmuls are IEEE fp32",
            },
            "channels_last": {
                "switch": "trainer.channels_last",
                "applicable": False,
                "reason": "NHWC pays off for cuDNN tensor-core convolutions in bf16/fp16; the CPU runs fp32 only "
                "(this VM has no bf16 units: benchmarks/README.md, reduced-precision teacher) and the trainer "
                "keeps CPU runs in fp32",
            },
        }
    net = build_network("fashion_mnist")
    out = {}
    for key, switch in (("tf32", {"tf32": True}), ("channels_last", {"channels_last": True})):
        rows = []
        for label, name in (("finetune", None), ("dmd", "dmd")):
            before, after = row(net, label, name, args), row(net, label, name, args, **switch)
            entry = {"objective": label, "off": before, "on": after}
            if "ms_per_iteration" in before and "ms_per_iteration" in after:
                entry["speedup"] = round(before["ms_per_iteration"] / after["ms_per_iteration"], 3)
            rows.append(entry)
        out[key] = {"switch": f"trainer.{key}", "applicable": True, "network": net.name, "rows": rows}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ema-repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parts", nargs="+", default=["checkpointing", "ema", "compile", "cuda_only"])
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=str(RESULTS / "switches_cpu.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("diffdistill").setLevel(logging.ERROR)
    result: dict[str, Any] = {
        "benchmark": "switches",
        "machine": machine_info(args.device),
        "note": args.note,
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "mixed_precision": args.mixed_precision},
    }
    parts = {"checkpointing": checkpointing_rows, "ema": ema_rows, "compile": compile_rows}
    for part in args.parts:
        if part == "cuda_only":
            result.update(cuda_only_rows(copy.copy(args)))
        else:
            result[part] = parts[part](copy.copy(args))
        write_result(args.out, result)
    result["machine"] = finish_info(result["machine"])
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
