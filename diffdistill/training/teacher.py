"""Train an EDM teacher (Karras et al. 2022) from scratch: the denoising loss with the EDM weighting.

This is the score-matching loop that produces teachers (no teacher exists to distil from yet); the
distillation objectives all run in :mod:`diffdistill.training.trainer`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffdistill.conventions import append_dims
from diffdistill.data.images import InfiniteBatcher
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.denoiser import edm_loss_weight
from diffdistill.models.io import build_from_config, save_model
from diffdistill.models.teacher import Teacher
from diffdistill.sampling import heun_sample
from diffdistill.schedules.karras import LogNormalSigma, karras_sigmas
from diffdistill.training.checkpoint import atomic_save, load_checkpoint, rng_state, seed_everything, set_rng_state
from diffdistill.training.ema import EMA
from diffdistill.training.logging import RunLogger
from diffdistill.utils.images import save_grid

log = logging.getLogger("diffdistill")


def denoising_loss(denoiser, x0, cond: Conditioning, sigma_sampler: LogNormalSigma) -> torch.Tensor:
    """Per-sample EDM loss ``lambda(sigma) ||D(x0 + sigma eps, sigma) - x0||^2`` averaged over elements (Eq. 8)."""
    sigma = sigma_sampler(x0.shape[0], x0.device)
    x = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
    err = (denoiser(x, sigma, cond) - x0) ** 2
    return edm_loss_weight(sigma, denoiser.sigma_data) * err.flatten(1).mean(1)


def drop_labels(cond: Conditioning, p: float, null_class: int | None) -> Conditioning:
    """Replace each class label by the null class with probability ``p`` (classifier-free guidance training)."""
    if p <= 0 or cond.class_labels is None or null_class is None:
        return cond
    drop = torch.rand(cond.class_labels.shape[0], device=cond.class_labels.device) < p
    return Conditioning(
        class_labels=torch.where(drop, torch.full_like(cond.class_labels, null_class), cond.class_labels)
    )


def train_teacher(
    model_config: dict[str, Any],
    dataset,
    out_dir: str | Path,
    steps: int = 5000,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup_steps: int = 200,
    ema_decay: float = 0.998,
    label_dropout: float = 0.1,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    grad_clip: float = 1.0,
    seed: int = 0,
    checkpoint_every: int = 500,
    sample_every: int = 500,
    sample_steps: int = 18,
    sample_guidance: float = 2.0,
    export_dir: str | Path | None = None,
    resume: bool = True,
    num_threads: int | None = None,
    command: str | None = None,
) -> Path:
    """Train a teacher denoiser with the EDM loss; exports the EMA weights as a model folder.

    Returns the exported folder (``export_dir`` or ``<out_dir>/model``).
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    export_dir = Path(export_dir) if export_dir else out_dir / "model"
    seed_everything(seed)
    model = build_from_config(dict(model_config)).train()
    ema = EMA(model, decay=ema_decay, warmup_steps=100)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    batcher = InfiniteBatcher(dataset, batch_size, seed=seed)
    sampler = LogNormalSigma(P_mean, P_std)
    logger = RunLogger(out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    step = 0
    if resume and ckpt_path.exists():
        st = load_checkpoint(ckpt_path)
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        batcher.load_state_dict(st["data"])
        set_rng_state(st["rng"])
        step = st["step"]
        logger.truncate_after(step)
        log.info("resumed teacher training at step %d", step)
    null_class = model.num_classes
    gen = torch.Generator().manual_seed(1234)
    n_cls = null_class or 1
    grid_labels = torch.arange(64) % n_cls if null_class else None
    grid_z = torch.randn(64, *model.sample_shape, generator=gen)
    meta = {
        "model_config": dict(model_config),
        "dataset": getattr(dataset, "name", "?"),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "label_dropout": label_dropout,
        "P_mean": P_mean,
        "P_std": P_std,
        "seed": seed,
        "command": command,
    }
    (out_dir / "teacher_config.json").write_text(json.dumps(meta, indent=2))

    def checkpoint(s: int) -> None:
        atomic_save(
            {
                "step": s,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "data": batcher.state_dict(),
                "rng": rng_state(),
                "model_config": dict(model_config),
            },
            ckpt_path,
        )
        save_model(ema.module, dict(model_config), export_dir, extra={**meta, "trained_steps": s})

    def samples(s: int) -> None:
        teacher = Teacher(ema.module, guidance_scale=sample_guidance)
        cond = Conditioning(class_labels=grid_labels)
        sig = karras_sigmas(sample_steps, model.sigma_min, model.sigma_max, append_zero=True)
        x = heun_sample(teacher, grid_z * sig[0], sig, cond)
        save_grid(x, out_dir / "samples" / f"step{s:07d}.png", nrow=8)

    bar = tqdm(total=steps, initial=step, desc="teacher", dynamic_ncols=True, mininterval=5)
    t0, ema_loss = time.time(), None
    while step < steps:
        batch = batcher.next()
        cond = drop_labels(batch.cond, label_dropout, null_class)
        loss = denoising_loss(model, batch.x0, cond, sampler).mean()
        if not math.isfinite(loss.item()):
            log.warning("non-finite teacher loss at step %d: batch skipped", step)
            opt.zero_grad(set_to_none=True)
            step += 1
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        ema.update(model)
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}")
        if step % 25 == 0:
            logger.log(
                step,
                {"loss": loss.item(), "grad_norm": float(gnorm), "lr": sched.get_last_lr()[0], "sec": time.time() - t0},
            )
        if step % checkpoint_every == 0 or step == steps:
            checkpoint(step)
        if step % sample_every == 0 or step == steps:
            samples(step)
    bar.close()
    logger.close()
    return export_dir
