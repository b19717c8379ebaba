"""Text-to-image step cost: an LCM step against a plain denoising fine-tune step on the real SD adapter path.

    python benchmarks/bench_t2i_step.py --merge --label 2  # ~3 min on 2 idle CPU cores (3 rounds, memory)
    python benchmarks/bench_t2i_step.py --quick            # smoke run (1 round, 2 pairs, no memory; JSON in /tmp)

The network is the tiny SD pipeline on which the diffusers LCM script (``train_lcm_distill_sd_wds.py``, commit
58eb52c) was timed (``benchmarks/README.md``): ``UNet2DConditionModel`` of 985,444 parameters (the ``SD_TINY_UNET``
config of ``_common.py``, cross-attention dim 32), 16x16x4 latents from 32x32 RGB images through a two-block
``AutoencoderKL``, a two-layer CLIP text encoder (hidden size 32) with the real CLIP vocabulary rebuilt offline, SD's
DDPM schedule; random weights, written as a ``StableDiffusionPipeline`` folder (nothing is downloaded).

Both steps are built as ``diffdistill-train`` builds them (``compose_config`` + ``build_trainer``) with
``backbone=sd backbone.path=<folder> data=fashion_mnist_t2i data.resolution=32 data.channels=3``: captioned pixel
images, so every ``train_step()`` encodes the captions with the teacher's text encoder and the pixels with its VAE,
as the peer's script does. ``objective=lcm ~schedule`` (the teacher's own 1000 DDPM timesteps, skipping step 20, CFG
w ~ U[3, 15] batched ``[cond; uncond]``, guidance-embedded student with LCM's boundary scalings) against
``objective=edm`` (a denoising fine-tune of the same network: EDM loss, one forward + backward). Both: batch 16,
fp32, AdamW, grad clip 10, one EMA track (0.999). The ratio is the median over alternated pairs (one LCM step, one
fine-tune step) in one process, rounds repeated and the median taken; with the prompt encoder's in-memory cache on
(the default: the 10 captions are encoded once) and off (``cache_size=0``: the distinct captions of every batch are
encoded each step, as the peer encodes each step). The split comes from timers around the trainer's calls (text
encode, VAE encode, teacher forward, target forward, student forward, backward, clip, optimiser, EMA, target EMA,
data, the rest); timer overhead is a few microseconds per call.

Memory (``--memory``; each mode in its own process): exact bytes of the distinct tensors of every role, the teacher,
optimiser state and EMA track, and the rise of the process's peak resident set (``VmHWM``) over LCM steps, for full
copies against ``student.lora={rank: 8, share_base: true}`` (the teacher, the target and the EMA track share one
frozen base).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from _common import (
    RESULTS,
    SD_TINY_UNET,
    PeakMemory,
    count_params,
    finish_info,
    machine_info,
    sync,
    tensor_bytes,
    write_result,
)

IMAGE_SIZE = 32  # 16x16 latents through the two-block VAE
BATCH = 16
PEER = {
    "code": "diffusers examples/consistency_distillation/train_lcm_distill_sd_wds.py (commit 58eb52c)",
    "ratio": 1.94,
    "lcm_ms": 344,
    "finetune_ms": 177,
    "split_ms": {"text": 7, "vae": 9, "teacher": 48, "target": 51, "student_fwd_bwd": 133, "clip_adamw": 23, "ema": 4},
    "note": "fp32 on the same kind of 2-core CPU (its autocast teacher, bf16 on CPU, disabled); text encoding and "
    "VAE encoding in both steps; two separate teacher forwards (conditional, unconditional)",
}
TARGET_RATIO = 1.55
PARTS = (
    "data",
    "text",
    "vae",
    "teacher",
    "target",
    "student_fwd",
    "backward",
    "clip",
    "optimizer",
    "ema",
    "target_ema",
    "other",
)


# ---------------------------------------------------------------------------------------------
# the pipeline


def peer_sd_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write the peer-shaped tiny ``StableDiffusionPipeline`` (985k-parameter UNet, 16x16x4 latents of 32x32 images)
    to ``folder`` with the classes and component configs of :mod:`diffdistill.testing.tiny_t2i`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffdistill.models.tokenizer import clip_tokenizer
    from diffdistill.testing.tiny_t2i import TEXT_DIM, ddpm_scheduler, tiny_text_config, tiny_vae_config

    unet_config = dict(SD_TINY_UNET, sample_size=IMAGE_SIZE // 2)
    if unet_config["cross_attention_dim"] != TEXT_DIM:
        raise ValueError("the UNet's cross-attention dim must be the text encoder's hidden size")
    torch.manual_seed(seed)
    tok = clip_tokenizer(kind="clip")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**tiny_vae_config("sd")),
        text_encoder=CLIPTextModel(tiny_text_config(tok)),
        tokenizer=tok,
        unet=UNet2DConditionModel(**unet_config),
        scheduler=ddpm_scheduler("epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def describe_pipeline(trainer) -> dict[str, Any]:
    t = trainer.teacher
    unet = t.denoiser.unet if hasattr(t.denoiser, "unet") else t.denoiser.net.unet
    return {
        "unet_params": count_params(unet),
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in SD_TINY_UNET.items()},
        "vae_params": count_params(t.latent),
        "text_encoder_params": count_params(t.prompt_encoder),
        "tokenizer_vocab": len(t.prompt_encoder.tokenizers[0]),
        "latent_shape": list(t.sample_shape),
        "image_shape": [3, IMAGE_SIZE, IMAGE_SIZE],
    }


# ---------------------------------------------------------------------------------------------
# trainers


def overrides(objective: str, pipe: Path, run_dir: str, args, lora: bool = False) -> list[str]:
    ov = [
        "~experiment",
        "backbone=sd",
        f"backbone.path={pipe}",
        f"objective={objective}",
        "data=fashion_mnist_t2i",
        f"data.resolution={IMAGE_SIZE}",
        "data.channels=3",
        f"data.limit={args.data_limit}",
        f"trainer.batch_size={BATCH}",
        f"trainer.device={args.device}",
        f"trainer.mixed_precision={args.mixed_precision}",
        f"trainer.num_threads={args.threads}",
        "trainer.sample_every=0",
        "trainer.checkpoint_every=0",
        "trainer.eval_every=0",
        "trainer.ema_decays=[0.999]",
        "trainer.grad_clip=10.0",
        "logger=none",
        "eval=none",
        f"run_dir={run_dir}",
    ]
    if objective == "lcm":
        ov.append("~schedule")  # LCM on SD: the teacher's own DDPM timesteps (LCM §4.1)
    if lora:
        ov.append("+student.lora={rank: 8, share_base: true}")
    return ov


def recorded_overrides(objective: str, args) -> list[str]:
    """The overrides as the JSON records them (the temporary pipeline folder named, the run folder left out)."""
    return [o for o in overrides(objective, Path("<tiny pipeline folder>"), "", args) if not o.startswith("run_dir=")]


def build(objective: str, pipe: Path, run_dir: str, args, lora: bool = False):
    from diffdistill.cli.common import compose_config
    from diffdistill.training.builders import build_trainer

    cfg = compose_config(overrides(objective, pipe, run_dir, args, lora))
    return build_trainer(cfg)


def set_prompt_cache(trainer, on: bool) -> None:
    """The teacher's prompt encoder with its in-memory cache on (default size) or off (every batch encoded)."""
    enc = trainer.teacher.prompt_encoder
    enc.cache_size = 4096 if on else 0
    enc._cache.clear()


# ---------------------------------------------------------------------------------------------
# the split


class Split:
    """Exclusive wall time of named calls (a call's time minus the timed calls inside it), per ``train_step``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device  # on a GPU every timer synchronises: a call's time includes its kernels
        self.current: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.steps: list[dict[str, float]] = []
        self._stack: list[float] = []

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            sync(self.device)
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*a, **kw)
            finally:
                sync(self.device)
                dt = time.perf_counter() - t0
                inner = self._stack.pop()
                self.current[name] += dt - inner
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1] += dt

        obj.__dict__[attr] = timed  # an instance attribute shadows the class method (nn.Module calls self.forward)

    def end_step(self) -> dict[str, float]:
        step = {k: 1000.0 * v for k, v in self.current.items()}
        step["total"] = sum(step.values())
        self.steps.append(step)
        self.current = defaultdict(float)
        return step

    def reset(self) -> None:
        self.steps, self.calls = [], defaultdict(int)

    def median(self) -> dict[str, float]:
        keys = [*PARTS, "total"]
        return {k: round(statistics.median(s.get(k, 0.0) for s in self.steps), 2) for k in keys if self.steps}


def instrument(trainer) -> Split:
    """Timers around every call of one iteration that the peer's split names (full copies: roles are distinct)."""
    s = Split(trainer.accelerator.device)
    t, roles = trainer.teacher, trainer.roles
    s.wrap(trainer, "train_step", "other")
    s.wrap(trainer.data, "next", "data")
    s.wrap(t.prompt_encoder, "encode", "text")
    s.wrap(t.latent, "encode", "vae")
    s.wrap(t, "forward", "teacher")
    s.wrap(roles["generator"].denoiser, "forward", "student_fwd")
    if "target_generator" in roles:
        s.wrap(roles["target_generator"].denoiser, "forward", "target")
    s.wrap(trainer.accelerator, "backward", "backward")
    s.wrap(trainer.accelerator, "clip_grad_norm_", "clip")
    for name in trainer.optimizers:
        s.wrap(trainer.optimizers[name], "step", "optimizer")
        s.wrap(trainer.schedulers[name], "step", "optimizer")
    for ema in trainer.emas.values():
        s.wrap(ema, "update", "ema")
    s.wrap(trainer.objective, "on_step_end", "target_ema")
    return s


def timed_step(trainer, split: Split) -> dict[str, float]:
    trainer.train_step()
    return split.end_step()


# ---------------------------------------------------------------------------------------------
# timing


def time_round(lcm, ref, s_lcm: Split, s_ref: Split, pairs: int, cached: bool) -> dict[str, Any]:
    """``pairs`` alternated (LCM step, fine-tune step) pairs; medians of times, split and per-pair ratios."""
    for tr in (lcm, ref):
        set_prompt_cache(tr, cached)
    s_lcm.reset()
    s_ref.reset()
    ratios = []
    load0 = os.getloadavg()[0]
    for i in range(pairs):
        first, second = ((lcm, s_lcm), (ref, s_ref)) if i % 2 == 0 else ((ref, s_ref), (lcm, s_lcm))
        a = timed_step(*first)["total"]
        b = timed_step(*second)["total"]
        ratios.append(a / b if first[0] is lcm else b / a)
    return {
        "cached": cached,
        "pairs": pairs,
        "lcm_ms": round(statistics.median(s["total"] for s in s_lcm.steps), 2),
        "finetune_ms": round(statistics.median(s["total"] for s in s_ref.steps), 2),
        "ratio": round(statistics.median(ratios), 4),
        "ratio_min_max": [round(min(ratios), 4), round(max(ratios), 4)],
        "split_lcm_ms": s_lcm.median(),
        "split_finetune_ms": s_ref.median(),
        "calls_per_step_lcm": {k: v / pairs for k, v in s_lcm.calls.items()},
        "calls_per_step_finetune": {k: v / pairs for k, v in s_ref.calls.items()},
        "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }


def summarize(rounds: list[dict[str, Any]], cached: bool) -> dict[str, Any]:
    """Medians over rounds. Times drift with the machine's load between rounds, so the split is also given as
    fractions of the same round's fine-tune step (robust to the drift) and in ms for the quietest round."""
    rs = [r for r in rounds if r["cached"] == cached]
    quiet = min(rs, key=lambda r: r["finetune_ms"])

    def med(get) -> float:
        return round(statistics.median(get(r) for r in rs), 4)

    parts = list(rs[0]["split_lcm_ms"])
    return {
        "rounds": len(rs),
        "ratio": med(lambda r: r["ratio"]),
        "ratio_per_round": [r["ratio"] for r in rs],
        "lcm_ms": med(lambda r: r["lcm_ms"]),
        "finetune_ms": med(lambda r: r["finetune_ms"]),
        "split_over_finetune_step": {
            side: {k: med(lambda r, k=k, side=side: r[f"split_{side}_ms"][k] / r["finetune_ms"]) for k in parts}
            for side in ("lcm", "finetune")
        },
        "quietest_round": {
            "round": quiet["round"],
            "load_average": quiet["load_average"],
            "ratio": quiet["ratio"],
            "split_lcm_ms": quiet["split_lcm_ms"],
            "split_finetune_ms": quiet["split_finetune_ms"],
        },
    }


def network_passes(args, pipe: Path) -> dict[str, Any]:
    """ms of the bare UNet passes at batch 16 (and the batched CFG pair at 32), text and VAE encodes: the unit costs
    behind the split."""
    from diffdistill.models.adapters.sd import sd_teacher

    dev = torch.device(args.device)
    teacher = sd_teacher(str(pipe)).to(dev)
    unet = teacher.denoiser.unet
    lat = torch.randn(BATCH, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2, device=dev)
    emb = torch.randn(BATCH, 77, 32, device=dev)
    t = torch.randint(0, 1000, (BATCH,), device=dev)
    img = torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, device=dev) * 2 - 1
    prompts = [f"a photo of a class {i}" for i in range(BATCH)]
    enc = teacher.prompt_encoder

    def med(fn, n=args.unit_repeats):
        fn()
        ts = []
        for _ in range(n):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            ts.append(1000 * (time.perf_counter() - t0))
        return round(statistics.median(ts), 2)

    def fwd_bwd():
        unet.requires_grad_(True)
        unet(lat, t, encoder_hidden_states=emb).sample.square().mean().backward()
        unet.zero_grad(set_to_none=True)
        unet.requires_grad_(False)

    with torch.no_grad():
        out = {
            "unet_forward_no_grad_b16": med(lambda: unet(lat, t, encoder_hidden_states=emb)),
            "unet_forward_no_grad_b32": med(
                lambda: unet(torch.cat([lat, lat]), torch.cat([t, t]), encoder_hidden_states=torch.cat([emb, emb]))
            ),
            "text_encode_16_prompts_uncached": med(lambda: enc._encode_uncached(prompts)),
            "vae_encode_b16": med(lambda: teacher.latent.encode(img)),
        }
    out["unet_forward_backward_b16"] = med(fwd_bwd)
    return out


# ---------------------------------------------------------------------------------------------
# memory (one mode per process)


def memory_child(mode: str, pipe: Path, args) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tr = build("lcm", pipe, tmp, args, lora=mode == "lora")
        for _ in range(2):
            tr.train_step()
        t = tr.teacher
        frozen_io = [t.prompt_encoder, t.latent]
        io_bytes = tensor_bytes(frozen_io)
        parts = {
            "roles_and_teacher_unet": tensor_bytes(tr.roles, t.denoiser),
            "optimizer_state": tensor_bytes(list(tr.optimizers.values())),
            "ema_tracks": tensor_bytes([e.module for e in tr.emas.values()]),
        }
        static = tensor_bytes(tr.roles, t, list(tr.optimizers.values()), [e.module for e in tr.emas.values()])
        trainable = sum(p.numel() * p.element_size() for p in tr.roles["generator"].parameters() if p.requires_grad)
        ms = []
        with PeakMemory("cpu") as pm:
            for _ in range(args.memory_steps):
                t0 = time.perf_counter()
                tr.train_step()
                ms.append(1000 * (time.perf_counter() - t0))
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        return {
            "mode": mode,
            "lora": {"rank": 8, "share_base": True} if mode == "lora" else None,
            "trainable_param_bytes": trainable,
            "static_mib": round(static / 2**20, 3),
            "static_without_text_encoder_and_vae_mib": round((static - io_bytes) / 2**20, 3),
            "text_encoder_and_vae_mib": round(io_bytes / 2**20, 3),
            "static_parts_mib (overlapping where shared)": {k: round(v / 2**20, 3) for k, v in parts.items()},
            "step_peak_rss_above_start_mib": None if pm.peak_mib is None else round(pm.peak_mib, 2),
            "process_peak_rss_mib": round(hwm, 1),
            "ms_per_step_median": round(statistics.median(ms), 1),
            "steps_measured": args.memory_steps,
        }


def memory_rows(pipe: Path, args) -> list[dict[str, Any]]:
    rows = []
    for mode in ("full", "lora"):
        cmd = [sys.executable, __file__, "--memory-child", mode, "--pipe", str(pipe), "--threads", str(args.threads)]
        cmd += ["--memory-steps", str(args.memory_steps), "--data-limit", str(args.data_limit)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            rows.append({"mode": mode, "error": out.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  memory [{mode}]: {rows[-1]}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------


def across_runs(runs: dict[str, dict[str, Any]], max_drift: float = 2.0) -> dict[str, Any]:
    """Per thread count: the ratio of every complete run (separate processes, other loads) and their median. A run
    whose fine-tune step time varies more than ``max_drift``-fold between its rounds had the machine's load change
    under it (its pairs no longer compare like with like): listed under ``unstable``, left out of the median."""
    by: dict[str, dict[str, list]] = {}
    for name, run in runs.items():
        if "cached" not in run:
            continue
        row = by.setdefault(
            str(run.get("threads", name)), {"runs": [], "cached": [], "uncached": [], "load": [], "unstable": []}
        )
        ft = [r["finetune_ms"] for r in run["rounds"]]
        if max(ft) > max_drift * min(ft):
            row["unstable"].append({"run": name, "finetune_ms_per_round": ft})
            continue
        row["runs"].append(name)
        row["load"].append(run["machine"]["load_average_at_start"][0])
        for key in ("cached", "uncached"):
            row[key].append(run[key]["ratio"])
    for row in by.values():
        for key in ("cached", "uncached"):
            row[f"{key}_median"] = round(statistics.median(row[key]), 4) if row[key] else None
    return by


def pass_row(pc) -> dict[str, float]:
    """``PassCount`` fields in units of one forward (a backward = 2, a JVP = 3) and their total cost."""
    return {**{k: getattr(pc, k) for k in ("forward", "forward_grad", "backward", "jvp")}, "cost": pc.cost()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=10, help="alternated (LCM, fine-tune) pairs per round and cache mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu | cuda (benchmarks/gpu_session.sh)")
    p.add_argument("--mixed-precision", default="no", help="no | bf16 (trainer.mixed_precision; CPU: fp32 only)")
    p.add_argument("--data-limit", type=int, default=2048)
    p.add_argument("--unit-repeats", type=int, default=10)
    p.add_argument("--memory-steps", type=int, default=4)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 round, 2 pairs, no memory (smoke run)")
    p.add_argument("--out", default=str(RESULTS / "t2i_step.json"))
    p.add_argument("--merge", action="store_true", help="keep the other runs of an existing --out")
    p.add_argument("--label", default=None, help="key of this run in the JSON's runs (default: the thread count)")
    p.add_argument("--pipe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, Path(args.pipe), args)))
        return
    if args.quick:
        args.rounds, args.pairs, args.warmup, args.no_memory, args.unit_repeats = 1, 2, 1, True, 2
        if Path(args.out) == RESULTS / "t2i_step.json":  # a smoke run never replaces the committed result
            args.out = str(Path(tempfile.gettempdir()) / "t2i_step_quick.json")
    if args.device != "cpu":
        args.no_memory = True  # the memory rows read the CPU process's resident set
    info = machine_info(args.device)
    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if args.merge and out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        pipe = peer_sd_pipeline(Path(tmp) / "pipe")
        lcm = build("lcm", pipe, str(Path(tmp) / "lcm"), args)
        ref = build("edm", pipe, str(Path(tmp) / "edm"), args)
        pc_l, pc_r = lcm.objective.pass_count(), ref.objective.pass_count()
        result.update(
            {
                "settings": {
                    "batch_size": BATCH,
                    "precision": "fp32" if args.mixed_precision == "no" else args.mixed_precision,
                    "device": args.device,
                    "warmup_steps": args.warmup,
                    "lcm_overrides": recorded_overrides("lcm", args),
                    "finetune_overrides": recorded_overrides("edm", args),
                    "optimizer": "AdamW (optim=adamw), grad clip 10, one EMA track 0.999 in both steps",
                    "lcm": "DDPM timesteps of the teacher (T=1000), skipping step 20, DDIM teacher step, CFG w ~ "
                    "U[3, 15] batched [cond; uncond] at 2B, guidance-embedded student (UNet time_cond_proj_dim), LCM "
                    "boundary scalings, target EMA 0.95, l2 distance",
                    "memory_method": "static: exact bytes of distinct tensors; step peak: rise of VmHWM (peak RSS, "
                    "reset via /proc/self/clear_refs after malloc_trim) over LCM steps, one process per mode",
                },
                "pipeline": describe_pipeline(lcm),
                "peer": PEER,
                "target_ratio": TARGET_RATIO,
                "pass_count": {
                    "lcm": pass_row(pc_l),
                    "finetune": pass_row(pc_r),
                    "estimate_ratio_networks_only": round(pc_l.cost() / pc_r.cost(), 3),
                },
            }
        )
        runs = result.setdefault("runs", {})
        run: dict[str, Any] = {"machine": info, "rounds_requested": args.rounds, "pairs_per_round": args.pairs}
        runs[args.label or str(args.threads)] = run
        s_lcm, s_ref = instrument(lcm), instrument(ref)
        for _ in range(args.warmup):
            timed_step(lcm, s_lcm)
            timed_step(ref, s_ref)
        rounds = []
        for r in range(args.rounds):
            for cached in (True, False):
                row = time_round(lcm, ref, s_lcm, s_ref, args.pairs, cached)
                rounds.append({"round": r, **row})
                print(
                    f"[{args.threads} thr] round {r} cached={cached}: lcm {row['lcm_ms']:.1f} ms, fine-tune "
                    f"{row['finetune_ms']:.1f} ms, ratio {row['ratio']:.3f} (load {row['load_average']})",
                    flush=True,
                )
                run["rounds"] = rounds
                write_result(out, result)
        run["cached"] = summarize(rounds, True)
        run["uncached"] = summarize(rounds, False)
        run["unit_costs_ms"] = network_passes(args, pipe)
        del lcm, ref
        if not args.no_memory:
            result["memory"] = {"threads": args.threads, "rows": memory_rows(pipe, args)}
        run["machine"] = finish_info(info)
        run["threads"] = args.threads
        result["summary"] = across_runs(runs)
        write_result(out, result)
    for key in ("cached", "uncached"):
        s = run[key]
        print(f"{key}: ratio {s['ratio']} (rounds {s['ratio_per_round']}), lcm {s['lcm_ms']} ms, ft {s['finetune_ms']}")
    print(json.dumps({k: run[k] for k in ("cached", "uncached", "unit_costs_ms")}, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
