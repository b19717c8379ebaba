"""The one training loop of diffdistill (docs/architecture.md §4), on ``accelerate``.

Every objective runs here: one optimiser per trainable role, the objective's update schedule, gradient
clipping, skip-and-log on non-finite losses or gradients, EMA tracks of the generator, sample grids
(teacher many-step beside student one-step, same seeds), in-loop evaluation, JSONL/TensorBoard logs,
and atomic checkpoints that hold everything needed to continue the same trajectory.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffdistill.data.loader import DataStream
from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.objectives.base import Objective
from diffdistill.sampling import heun_sample
from diffdistill.schedules.karras import karras_sigmas
from diffdistill.training.checkpoint import (
    clean_temporary,
    load_checkpoint,
    newest_valid_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from diffdistill.training.conditioning import encode_prompts, latent_codec_of, prepare_batch, prompt_encoder_of
from diffdistill.training.ema import EMA
from diffdistill.training.logging import LoggerConfig, MetricWindow, TrackerLogger, build_trackers
from diffdistill.training.optim import OptimizerSpec, count_generator_updates
from diffdistill.training.switches import (
    check_role_switch,
    compile_role,
    enable_activation_checkpointing,
    set_tf32,
    switch_roles,
    to_channels_last,
)
from diffdistill.utils.distributed import (
    all_true,
    any_true,
    average_gradients,
    broadcast_parameters,
    mean_scalars,
    micro_seed,
)
from diffdistill.utils.images import figure_to_image, save_png, side_by_side_image

log = logging.getLogger("diffdistill")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class NonFiniteError(RuntimeError):
    """Raised after too many consecutive non-finite updates (the run is diverging, not glitching)."""


@dataclass
class TrainerConfig:
    """Loop settings (``configs/trainer/*.yaml``).

    Args:
        max_steps: training iterations (each = one critic update and, on schedule, a generator update).
        max_time_s: also stop once this many seconds were spent in training iterations (0 = no limit;
            sampling, evaluation and checkpointing are not counted; the count survives a resume). A fixed
            compute budget for comparing objectives.
        batch_size: samples per micro-batch on each process; an update sees ``batch_size x
            gradient_accumulation_steps x processes`` samples (each micro-batch with its own noise).
        gradient_accumulation_steps: micro-batches whose gradients are summed before each update.
        grad_clip: max gradient norm per role (DMD2: 10); ``0`` disables clipping.
        ema_decays: generator EMA tracks kept beside the online weights.
        ema_warmup_steps: during the first updates each track uses ``min(decay, (1 + n) / (10 + n))``, so the random
            initial weights of a network trained from scratch wash out (the EDM teacher recipe: 100).
        mixed_precision: accelerate's ``no`` / ``bf16`` / ``fp16``; ``null`` = what the launcher or ``accelerate
            config`` sets (else ``no``); on CPU always ``no`` (fp32).
        device: ``cpu``, ``cuda`` or ``auto``.
        log_every, sample_every, checkpoint_every, eval_every: intervals in iterations (0 = never).
        keep_checkpoints: how many step checkpoints to keep (0 = all).
        resume: ``null`` (fresh run; refuses a folder that holds checkpoints), ``auto`` (latest in the
            run folder, or fresh) or a checkpoint path.
        init_from: ``null``, or a checkpoint / run folder whose role weights start this run (a weights-only init,
            DMD2's ``--ckpt_only_path``): every role of the checkpoint that this run builds is loaded (EMA tracks
            start from the loaded generator), optimisers, schedulers, data position and step start fresh (step 0).
            Ignored when the run resumes (``resume``): its own checkpoint holds everything.
        max_nonfinite_streak: consecutive skipped updates before the run stops with an error.
        num_threads: ``torch.set_num_threads`` (CPU).
        num_grid_samples: images in each sample grid (flat toy data: points of each scatter, at least 1000).
        teacher_sample_steps: Heun steps of the teacher grid.
        compile: ``torch.compile`` (``nn.Module.compile``) of roles' denoisers: ``true`` = every trainable role, or
            a list of roles (``[generator]``).
        channels_last: NHWC memory format of image roles: ``true`` = every trainable role, or a list of roles
            (``[generator, teacher]``); helps convolutions on CUDA tensor cores in bf16/fp16, not on CPU.
        gradient_checkpointing: activation checkpointing (recompute block activations in the backward pass):
            ``true`` = every trainable role, or a list (``[generator, fake_score]``; ``teacher`` for objectives
            that backpropagate through it). Same gradients, less activation memory, about one more forward.
        tf32: TF32 matmuls and convolutions on CUDA for fp32 work (the fp32 parts of a bf16 run, fp32 runs);
            no effect on CPU.
        grid_prompts: the prompts of a text-to-image teacher's sample grid (one per column; ``null`` = the data's
            first distinct captions, at most 8).
    """

    max_steps: int = 1000
    max_time_s: float = 0.0
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    grad_clip: float = 10.0
    ema_decays: list[float] = field(default_factory=lambda: [0.999])
    ema_warmup_steps: int = 0
    mixed_precision: str | None = None
    device: str = "auto"
    log_every: int = 10
    sample_every: int = 100
    checkpoint_every: int = 100
    eval_every: int = 0
    keep_checkpoints: int = 3
    resume: str | None = None
    init_from: str | None = None
    max_nonfinite_streak: int = 20
    num_threads: int | None = None
    num_grid_samples: int = 32
    teacher_sample_steps: int = 18
    compile: bool | list[str] = False
    channels_last: bool | list[str] = False
    seed: int = 0
    gradient_checkpointing: bool | list[str] = False
    tf32: bool = False
    grid_prompts: list[str] | None = None

    def __post_init__(self) -> None:
        """Types and ranges are checked when the run is built, each failure one line naming its key."""
        from diffdistill.utils.validate import check_types, require

        check_types(self, "trainer")
        for key in ("compile", "channels_last", "gradient_checkpointing"):
            setattr(self, key, check_role_switch(f"trainer.{key}", getattr(self, key)))
        require(self.max_steps >= 1, "trainer.max_steps", "must be >= 1", self.max_steps)
        require(self.batch_size >= 1, "trainer.batch_size", "must be >= 1", self.batch_size)
        require(
            self.gradient_accumulation_steps >= 1,
            "trainer.gradient_accumulation_steps",
            "must be >= 1",
            self.gradient_accumulation_steps,
        )
        for key in (
            "max_time_s",
            "ema_warmup_steps",
            "grad_clip",
            "log_every",
            "sample_every",
            "checkpoint_every",
            "eval_every",
            "keep_checkpoints",
            "num_grid_samples",
            "teacher_sample_steps",
        ):
            require(getattr(self, key) >= 0, f"trainer.{key}", "must be >= 0", getattr(self, key))
        require(
            self.max_nonfinite_streak >= 1, "trainer.max_nonfinite_streak", "must be >= 1", self.max_nonfinite_streak
        )
        require(
            self.num_threads is None or self.num_threads >= 1,
            "trainer.num_threads",
            "must be >= 1 or null",
            self.num_threads,
        )
        for d in self.ema_decays:
            require(isinstance(d, (int, float)) and 0.0 <= d < 1.0, "trainer.ema_decays", "must lie in [0, 1)", d)
        require(
            self.mixed_precision in (None, "no", "bf16", "fp16"),
            "trainer.mixed_precision",
            "must be null, no, bf16 or fp16",
            self.mixed_precision,
        )
        dev = self.device
        require(
            dev in ("auto", "cpu") or dev == "cuda" or dev.startswith("cuda:"),
            "trainer.device",
            "must be auto, cpu, cuda or cuda:<index>",
            dev,
        )
        if dev.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"trainer.device={dev}, but this machine has no CUDA device (use auto or cpu)")


def check_data_matches(dataset, generator: nn.Module, teacher: nn.Module, batch_size: int) -> None:
    """The data fits the networks: sample shape (a latent teacher also takes the images its VAE encodes), captions
    only for a teacher with a text encoder, class labels within the teacher's classes, enough samples."""
    shape = getattr(dataset, "sample_shape", None)
    want = tuple(getattr(generator, "sample_shape", ()) or ())
    codec = latent_codec_of(teacher)
    pixels = tuple(codec.image_shape(want)) if codec is not None and want else None
    if shape is not None and want and tuple(shape) not in (want, pixels):
        also = f" or images of shape {pixels} for its VAE" if pixels else ""
        raise ValueError(
            f"the data's samples have shape {tuple(shape)} but the student/teacher network takes {want}{also} "
            "(check data.resolution / data.channels / data.dim against the backbone)"
        )
    scale = getattr(dataset, "scaling_factor", None)
    if scale is not None and codec is not None and getattr(codec, "scaling_factor", scale) != scale:
        raise ValueError(
            f"the latents of the data were encoded with scaling_factor {scale}, but the teacher's VAE uses "
            f"{codec.scaling_factor}: re-encode them with this teacher's VAE (diffdistill.data.latents.encode_latents)"
        )
    if (
        getattr(dataset, "captions", None) is not None
        and prompt_encoder_of(teacher) is None
        and not (getattr(teacher, "num_classes", None) and getattr(dataset, "num_classes", None))
    ):
        raise ValueError(
            f"the data ({getattr(dataset, 'name', type(dataset).__name__)}) serves prompts, but the teacher has no "
            "text encoder: use a text-to-image teacher (backbone group) or data without captions"
        )
    n_data, n_teacher = getattr(dataset, "num_classes", None), getattr(teacher, "num_classes", None)
    if n_data is not None and n_teacher is not None and n_data > n_teacher:
        raise ValueError(
            f"the data has {n_data} classes but the teacher knows {n_teacher}: labels beyond {n_teacher - 1} would "
            "index past its class embedding (check data.num_classes)"
        )
    if hasattr(dataset, "__len__") and len(dataset) < batch_size:
        raise ValueError(
            f"a global batch of {batch_size} (trainer.batch_size x gradient_accumulation_steps x processes) exceeds "
            f"the {len(dataset)} samples of the dataset (data group)"
        )


class DistillTrainer:
    """Runs an :class:`Objective` to completion.

    Args:
        objective: the objective; it holds references to the role modules.
        roles: every module the objective uses that the trainer must checkpoint, by role name; the
            trainable ones are those in ``objective.roles``.
        teacher: the frozen teacher (for the reference sample grid).
        dataset: a dataset with ``get(idx) -> Batch`` and ``__len__``.
        run_dir: the run folder (config, logs, checkpoints, samples).
        config: loop settings.
        optim: optimiser settings.
        evaluator: optional ``evaluator(generator, step) -> dict`` called every ``eval_every`` steps.
        run_config: the resolved run config, saved in each checkpoint.
        logger: trackers besides ``metrics.jsonl`` (default: TensorBoard under ``<run_dir>/tb``).
    """

    def __init__(
        self,
        objective: Objective,
        roles: dict[str, nn.Module],
        teacher: nn.Module,
        dataset,
        run_dir: str | Path,
        config: TrainerConfig | None = None,
        optim: OptimizerSpec | None = None,
        evaluator=None,
        run_config: dict[str, Any] | None = None,
        logger: LoggerConfig | None = None,
    ):
        from accelerate import Accelerator

        self.cfg = config or TrainerConfig()
        self.objective, self.roles, self.teacher, self.dataset = objective, roles, teacher, dataset
        self.run_dir = Path(run_dir)
        self.evaluator, self.run_config = evaluator, run_config
        if evaluator is not None and hasattr(evaluator, "attach"):  # text encoder, VAE and prompts of the run
            evaluator.attach(teacher, dataset)
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        missing = [r for r in (*objective.roles, *objective.frozen_roles) if r not in roles]
        if missing:
            raise ValueError(f"objective '{objective.name}' needs roles {missing}, which were not built")
        if objective.requires_real_data and getattr(dataset, "sample_shape", None) is None:
            what = "prompts only" if getattr(dataset, "captions", None) is not None else "no samples"
            raise ValueError(
                f"objective '{objective.name}' trains on real samples, but the data group "
                f"({getattr(dataset, 'name', type(dataset).__name__)}) serves {what}: choose data with samples, "
                "e.g. data=latents (precomputed latents with captions), data=fashion_mnist_t2i (images with "
                "captions) or an image dataset; prompt-only data suits data-free objectives (dmd, sid, ...)"
            )
        device = self.cfg.device
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        mp = self.cfg.mixed_precision  # None: accelerate reads the launcher's / `accelerate config`'s choice
        if cpu and mp not in (None, "no"):
            log.warning("mixed_precision=%s requested on CPU: training in fp32 instead (no bf16 units assumed)", mp)
            mp = "no"
        if cpu and mp is None and os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
            mp = "no"
        self.logger_config = logger if logger is not None else LoggerConfig()
        trackers = build_trackers(self.logger_config, self.run_dir)  # fails here on an unusable tracker
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision=mp, log_with=trackers or None, project_dir=str(self.run_dir)
        )
        self.device = self.accelerator.device
        kind = str(self.accelerator.distributed_type).rsplit(".", 1)[-1]
        if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise ValueError(
                f"accelerate is configured for {kind}, which diffdistill does not support yet: every process holds "
                "each role whole and the trainer averages gradients itself (use a MULTI_GPU config, see "
                "docs/multi_node.md)"
            )
        self.world_size, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.teacher.to(self.device)
        self.generator_roles = tuple(objective.generator_roles)
        self.critic_roles = tuple(r for r in objective.roles if r not in self.generator_roles)
        self.optimizers, self.schedulers = {}, {}
        # what each role trains, fixed now: frozen parts of a role (a LoRA student's base) stay frozen
        self._trainable = {r: [p for p in roles[r].parameters() if p.requires_grad] for r in objective.roles}
        optim = optim or OptimizerSpec()
        for name in (*objective.roles, *objective.frozen_roles):
            roles[name].to(self.device)
        for module in objective.auxiliary_modules().values():
            module.to(self.device)
        self._apply_switches()
        updates = {}
        if optim.needs_num_updates:  # a decaying LR schedule spans each role's updates in max_steps iterations
            n_gen = count_generator_updates(objective.update_schedule, self.cfg.max_steps)
            updates = {r: n_gen if r in self.generator_roles else self.cfg.max_steps for r in objective.roles}
        for name in objective.roles:
            module = roles[name]
            opt, sched = optim.build(name, module, updates.get(name))
            # only the optimiser goes through accelerate (loss scaling); gradients are averaged by the trainer
            # itself across processes (diffdistill/utils/distributed.py), so roles stay plain modules
            self.optimizers[name], self.schedulers[name] = self.accelerator.prepare(opt), sched
        broadcast_parameters([roles[n] for n in (*objective.roles, *objective.frozen_roles)])
        for name in switch_roles("trainer.compile", self.cfg.compile, objective.roles, self._switchable()):
            if not compile_role(self._switch_target(name)):
                log.warning("trainer.compile: role '%s' has no denoiser to compile; left eager", name)
        gen = roles["generator"]
        self.emas = {float(d): EMA(gen, float(d), warmup_steps=self.cfg.ema_warmup_steps) for d in self.cfg.ema_decays}
        # one global batch per iteration, the same on every process; micro-batch v takes slice v of it
        self.accumulation = self.cfg.gradient_accumulation_steps
        self.global_batch = self.cfg.batch_size * self.accumulation * self.world_size
        check_data_matches(dataset, roles["generator"], teacher, self.global_batch)
        # this process's micro-batches (in-memory slices, or decoded by DataLoader workers), exactly resumable
        self.data = DataStream(
            dataset, self.cfg.batch_size, self.accumulation, self.world_size, self.rank, self.cfg.seed, self.device
        )
        self.step = 0
        self.train_seconds = 0.0
        self.nonfinite = {"skipped": 0, "streak_generator": 0, "streak_critic": 0}
        self.last_good_checkpoint: Path | None = None
        self.interrupted: str | None = None  # the signal that stopped fit() early, if any

    def _switchable(self) -> list[str]:
        return list(dict.fromkeys([*self.roles, *self.objective.roles, *self.objective.frozen_roles, "teacher"]))

    def _switch_target(self, name: str) -> nn.Module:
        return self.teacher if name == "teacher" else self.roles[name]

    def _apply_switches(self) -> None:
        """The memory and speed switches of ``trainer`` (diffdistill/training/switches.py), per role."""
        c, trainable, known = self.cfg, self.objective.roles, self._switchable()
        if c.tf32:
            log.info("trainer.tf32: %s", set_tf32(True, self.device))
        for name in switch_roles("trainer.gradient_checkpointing", c.gradient_checkpointing, trainable, known):
            # `true` skips roles with nothing to checkpoint (light discriminator heads); a named role must have one
            if enable_activation_checkpointing(self._switch_target(name)) == 0 and c.gradient_checkpointing is not True:
                raise ValueError(
                    f"trainer.gradient_checkpointing: role '{name}' holds no network that supports activation "
                    "checkpointing (diffusers models and diffdistill's MLP backbone do); remove it from the list"
                )
        for name in switch_roles("trainer.channels_last", c.channels_last, trainable, known):
            to_channels_last(self._switch_target(name))

    # ------------------------------------------------------------------------------------------
    # state

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own state (no module weights: those go to model folders), safe for ``weights_only``."""
        return {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "objective": self.objective.name,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "ema_meta": {str(d): {"num_updates": e.num_updates, "decay": e.decay} for d, e in self.emas.items()},
            "objective_state": self.objective.state_dict(),
            "data": self.data.state_dict(),
            "rng": rng_state(),
            "nonfinite": dict(self.nonfinite),
        }

    def _model_folders(self) -> dict[str, tuple[nn.Module, dict | None, dict | None]]:
        """Every role (but the teacher) and EMA track as ``(module, model config, metadata)``; the generator's
        config is required (it makes the student loadable alone), other roles fall back to weights only."""
        from diffdistill.models.io import model_config

        unwrap = self.accelerator.unwrap_model
        meta = self._model_metadata()
        out: dict[str, tuple[nn.Module, dict | None, dict | None]] = {}
        for name, module in self.roles.items():
            if name == "teacher":
                continue
            module = unwrap(module)
            try:
                config = model_config(module)
            except ValueError:
                if name == "generator":
                    raise
                config = None
            out[name] = (module, config, {**meta, "role": name, "ema_decay": None})
        for d, e in self.emas.items():
            out[f"ema_{d}"] = (e.module, model_config(e.module), {**meta, "role": "generator", "ema_decay": d})
        return out

    def _model_metadata(self) -> dict[str, Any]:
        obj = self.objective
        cfg = self.run_config or {}
        gen = self.accelerator.unwrap_model(self.roles["generator"])
        return {
            "objective": obj.name,
            "paper": {"title": obj.paper.title, "arxiv": obj.paper.arxiv} if obj.paper else None,
            "step": self.step,
            "train_seconds": self.train_seconds,
            "batch_size": self.cfg.batch_size,
            "teacher": (cfg.get("backbone") or {}).get("path") or (cfg.get("backbone") or {}).get("_target_"),
            "guidance": getattr(gen, "guidance", None),
            "run_name": cfg.get("name"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :func:`~diffdistill.training.checkpoint.load_checkpoint`'s dict."""
        if state.get("objective") not in (None, self.objective.name):
            raise ValueError(f"checkpoint was written by objective '{state['objective']}', not '{self.objective.name}'")
        unwrap = self.accelerator.unwrap_model
        for k, sd in state["roles"].items():
            if k not in self.roles:
                raise ValueError(f"checkpoint holds role '{k}' that this run does not build")
            try:
                unwrap(self.roles[k]).load_state_dict(sd)
            except RuntimeError as e:
                missing = [n for n in unwrap(self.roles[k]).state_dict() if n not in sd][:3]
                extra = [n for n in sd if n not in unwrap(self.roles[k]).state_dict()][:3]
                raise ValueError(
                    f"checkpoint '{state.get('path', '?')}': its '{k}' does not match this run's network (missing "
                    f"{missing}, unexpected {extra}): a checkpoint of another experiment, or of a student with or "
                    "without LoRA adapters where this run differs"
                ) from e
        for k, sd in state["optimizers"].items():
            self.optimizers[k].load_state_dict(sd)
        for k, sd in state["schedulers"].items():
            self.schedulers[k].load_state_dict(sd)
        for d, sd in state["ema"].items():
            if float(d) in self.emas:
                self.emas[float(d)].load_state_dict(sd)
        self.objective.load_state_dict(state.get("objective_state") or {})
        self.data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.nonfinite = dict(state.get("nonfinite", self.nonfinite))
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))

    def init_from_checkpoint(self, path: str | Path) -> dict[str, list[str]]:
        """Start this run from the role weights of another run's checkpoint (``trainer.init_from``): each role of
        the checkpoint that this run builds is loaded in place; optimisers, schedulers, data position and the step
        stay fresh; EMA tracks restart from the loaded generator. Roles this run builds that the checkpoint lacks
        keep their initialisation (e.g. DMD2 stage 2's discriminator over stage 1's generator and fake score).
        Returns ``{"loaded", "fresh", "unused"}`` role names (also logged)."""
        from diffdistill.models.io import resolve_checkpoint
        from diffdistill.training.checkpoint import load_role_weights

        if not Path(path).exists():
            raise FileNotFoundError(f"trainer.init_from: checkpoint '{path}' does not exist")
        folder = resolve_checkpoint(path)
        weights = load_role_weights(folder)
        ours = [k for k in self.roles if k != "teacher"]
        loaded = [k for k in ours if k in weights]
        if "generator" not in loaded:
            raise ValueError(
                f"trainer.init_from: checkpoint '{folder}' holds roles {sorted(weights)} but no 'generator'; this run "
                f"builds {ours}: give a checkpoint of a distillation run (its checkpoints/step*/ folder or run folder)"
            )
        unwrap = self.accelerator.unwrap_model
        for k in loaded:
            module = unwrap(self.roles[k])
            try:
                module.load_state_dict(weights[k])
            except RuntimeError as e:
                missing = [n for n in module.state_dict() if n not in weights[k]][:3]
                extra = [n for n in weights[k] if n not in module.state_dict()][:3]
                raise ValueError(
                    f"trainer.init_from: the '{k}' of checkpoint '{folder}' does not match this run's network (missing "
                    f"{missing}, unexpected {extra}; {_one_line(e)[:200]}): init from a run of the same teacher and "
                    "student (with or without LoRA adapters alike)"
                ) from None
        for decay in list(self.emas):  # tracks restart from the loaded generator
            self.emas[decay] = EMA(unwrap(self.roles["generator"]), decay, warmup_steps=self.cfg.ema_warmup_steps)
        fresh = [k for k in ours if k not in weights]
        unused = sorted(k for k in weights if k not in self.roles)
        log.info(
            "initialised from %s (weights only, step 0, fresh optimisers): loaded %s; not in the checkpoint, kept "
            "as built: %s; in the checkpoint, not used by this run: %s",
            folder,
            ", ".join(loaded),
            ", ".join(fresh) or "none",
            ", ".join(unused) or "none",
        )
        return {"loaded": loaded, "fresh": fresh, "unused": unused}

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """``checkpoints/step<N>/`` (model folders + trainer state, atomic), written by the main process while the
        others wait; then old ones rotate out, except while updates are being skipped as non-finite: a
        checkpoint taken during such a streak never pushes the last one from before it out."""
        path = self.ckpt_dir / f"step{self.step:07d}"
        streak = self.nonfinite["streak_generator"] + self.nonfinite["streak_critic"]
        if self.is_main:
            save_checkpoint(path, self._model_folders(), self.state_dict(), self.run_config)
            if streak == 0:
                self.last_good_checkpoint = path
                if self.cfg.keep_checkpoints > 0:
                    steps = sorted(p for p in self.ckpt_dir.glob("step*") if p.is_dir())
                    for old in steps[: -self.cfg.keep_checkpoints]:
                        shutil.rmtree(old, ignore_errors=True)
            else:
                log.warning(
                    "checkpoint %s written during a streak of %d skipped updates: older ones kept", path, streak
                )
        self.accelerator.wait_for_everyone()
        return path

    def _resume_path(self) -> Path | None:
        from diffdistill.models.io import latest_checkpoint, resolve_checkpoint

        r = self.cfg.resume
        latest = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir.exists() else None
        if r is None:
            if latest is not None:
                raise FileExistsError(
                    f"run folder '{self.run_dir}' already holds checkpoints; pass trainer.resume=auto to continue it "
                    "or choose another run_dir (nothing was overwritten)"
                )
            return None
        if r == "auto":
            if latest is None:
                return None
            found, rejected = newest_valid_checkpoint(self.ckpt_dir)
            for bad, why in rejected:
                log.warning("not resuming from %s: %s", bad, why)
            if found is None:
                raise ValueError(
                    f"run folder '{self.run_dir}' holds checkpoints but none of them verifies ({rejected[0][1]}); "
                    "refusing to start afresh over it: choose another run_dir or remove the checkpoints"
                )
            if rejected:
                log.warning("resuming from %s, the newest checkpoint that verifies", found)
            return found
        if not Path(r).exists():
            raise FileNotFoundError(f"trainer.resume: checkpoint '{r}' does not exist")
        return resolve_checkpoint(r)

    # ------------------------------------------------------------------------------------------
    # one update

    def _set_trainable(self, names: tuple[str, ...]) -> None:
        for r in self.objective.roles:
            for p in self._trainable[r]:
                p.requires_grad_(r in names)

    def _micro_batches(self) -> list[tuple[int, Batch]]:
        """This process's micro-batches of the iteration, each with its virtual rank ``v`` (its slice of the
        global batch and its seeds; see diffdistill/utils/distributed.py), prompts encoded and pixels turned into
        the teacher's latents (:func:`~diffdistill.training.conditioning.prepare_batch`; images a data-free
        objective never reads are not encoded)."""
        real = bool(self.objective.requires_real_data)
        return [(v, prepare_batch(b, self.teacher, real_samples=real)) for v, b in self.data.next()]

    def _update(self, names: tuple[str, ...], kind: str, loss_fn, micro: list[tuple[int, Batch]]) -> dict | None:
        """One optimiser step of ``names``: the loss of every micro-batch, each seeded by its virtual rank,
        backpropagated with weight 1 / accumulation; gradients averaged across processes; clipped; stepped.
        Returns the logged scalars, or ``None`` when the objective has no such update this iteration."""
        for n in names:
            self.optimizers[n].zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        finite = True
        for v, batch in micro:
            torch.manual_seed(micro_seed(self.cfg.seed, self.step, kind, v))
            out = loss_fn(batch)
            if out is None:
                return None
            loss = out.loss.mean()
            for key, value in {f"{kind}_loss": float(loss.detach()), **out.logs}.items():
                sums[key] = sums.get(key, 0.0) + float(value) / len(micro)
            if not torch.isfinite(loss):
                finite = False
                continue
            self.accelerator.backward(loss / len(micro))
        logs = mean_scalars(sums, self.device)
        if not all_true(finite, self.device):
            return self._skip(names, kind, f"non-finite {kind} loss", logs)
        for n in names:
            average_gradients(self._trainable[n])
        for n in names:
            params = [p for p in self._trainable[n] if p.grad is not None]
            if self.cfg.grad_clip > 0:
                gnorm = self.accelerator.clip_grad_norm_(params, self.cfg.grad_clip)
            else:
                gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params else 0.0
            gnorm = float(gnorm)
            logs[f"{n}_grad_norm"] = gnorm
            if not math.isfinite(gnorm):
                return self._skip(names, kind, f"non-finite gradient of '{n}'", logs)
        for n in names:
            self.optimizers[n].step()
            self.schedulers[n].step()
            self.optimizers[n].zero_grad(set_to_none=True)
        self.nonfinite[f"streak_{kind}"] = 0
        return logs

    def _skip(self, names, kind: str, why: str, logs: dict) -> dict:
        """Drop this update (weights and optimiser state untouched), log it, stop if it keeps happening."""
        for n in names:
            self.optimizers[n].zero_grad(set_to_none=True)
        self.nonfinite["skipped"] += 1
        self.nonfinite[f"streak_{kind}"] += 1
        streak = self.nonfinite[f"streak_{kind}"]
        log.warning(
            "step %d: %s, update of %s skipped (%d skipped so far)",
            self.step,
            why,
            list(names),
            self.nonfinite["skipped"],
        )
        if streak >= self.cfg.max_nonfinite_streak:
            good = self.last_good_checkpoint
            where = (
                f"the last checkpoint from before the streak is {good} (resume from it with trainer.resume={good})"
                if good is not None and Path(good).exists()
                else "no checkpoint was written before the streak"
            )
            raise NonFiniteError(
                f"{streak} consecutive non-finite {kind} updates at step {self.step} ({why}); the run is "
                f"diverging. Lower the learning rate or check the teacher and the data; {where}"
            )
        return {**logs, "skipped": 1.0}

    def train_step(self) -> dict[str, float]:
        """One iteration: the generator update (on schedule), then the critic update, on the same batches."""
        micro = self._micro_batches()
        logs: dict[str, float] = {}
        obj = self.objective
        if obj.update_schedule.is_generator_step(self.step):
            self._set_trainable(self.generator_roles)
            out = self._update(self.generator_roles, "generator", lambda b: obj.generator_loss(b, self.step), micro)
            logs.update(out or {})
            for ema in self.emas.values():
                ema.update(self.accelerator.unwrap_model(self.roles["generator"]))
        if self.critic_roles:
            self._set_trainable(self.critic_roles)
            out = self._update(self.critic_roles, "critic", lambda b: obj.critic_loss(b, self.step), micro)
            logs.update(out or {})
        obj.on_step_end(self.step)
        self.step += 1
        return logs

    # ------------------------------------------------------------------------------------------
    # samples

    def _grid_prompts(self) -> list[str] | None:
        """The fixed prompts of a text-to-image teacher's grid (``trainer.grid_prompts``, else the data's first
        distinct captions, else the empty prompt); ``None`` for teachers without a text encoder."""
        from diffdistill.data.prompts import dataset_prompts

        if prompt_encoder_of(self.teacher) is None:
            return None
        if self.cfg.grid_prompts:
            return list(self.cfg.grid_prompts)
        return dataset_prompts(self.dataset, min(8, max(1, self.cfg.num_grid_samples))) or [""]

    def _grid_inputs(self) -> tuple[torch.Tensor, Conditioning]:
        shape = self.roles["generator"].sample_shape
        # points of flat (toy) data are cheap and a scatter of a few dozen shows no modes
        n = self.cfg.num_grid_samples if len(shape) != 1 else max(self.cfg.num_grid_samples, 1000)
        z = torch.randn(n, *shape, generator=torch.Generator().manual_seed(12345))
        prompts = self._grid_prompts()
        if prompts is not None:  # column j of the grid shows prompt j
            cond = encode_prompts([prompts[i % len(prompts)] for i in range(n)], self.teacher, self.device)
            return z.to(self.device), cond
        k = getattr(self.teacher, "num_classes", None)
        cond = Conditioning(class_labels=torch.arange(n) % k) if k else Conditioning()
        return z.to(self.device), cond.to(self.device)

    @torch.no_grad()
    def sample_grid(self) -> dict[str, float]:
        """Teacher (Heun, many steps) beside the student's EMA samples (one step; Heun like the teacher when the
        objective trains a denoiser, ``student_sampler = "heun"``), same seeds; writes the PNG."""
        return self._sample_grid()[0]

    @property
    def _student_heun(self) -> bool:
        """Whether the objective's student is a denoiser sampled like the teacher (EDM training), not a generator."""
        return self.objective.student_sampler == "heun"

    def _heun(self, model: nn.Module, denoise, z: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``teacher_sample_steps`` Heun steps over ``model``'s Karras grid (Karras et al. 2022, Alg. 1)."""
        sig = karras_sigmas(self.cfg.teacher_sample_steps, model.sigma_min, model.sigma_max, append_zero=True)
        prior = model.prior_std(float(sig[0])) if hasattr(model, "prior_std") else float(sig[0])
        return heun_sample(denoise, z * prior, sig, cond)

    def _grid_labels(self, few_steps: int | None) -> tuple[str, list[str]]:
        """The figure title (objective, training step) and one header per panel (sampler, steps, NFE)."""
        n = self.cfg.teacher_sample_steps
        ema = f" (EMA {max(self.emas):g})" if self.emas else " (online)"
        heun = f"Heun {n} step{'s' if n > 1 else ''} ({2 * n - 1} NFE)"
        labels = [f"teacher: {heun}", f"student{ema}: {heun if self._student_heun else '1 step (1 NFE)'}"]
        if few_steps is not None:
            labels.append(f"student{ema}: {few_steps} steps ({few_steps} NFE)")
        return f"{self.objective.name}: training step {self.step}", labels

    @torch.no_grad()
    def _sample_grid(self) -> tuple[dict[str, float], Any]:
        """``(stats, image)``: sample statistics and the labelled figure (``None`` for non-image, non-2-D data)."""
        z, cond = self._grid_inputs()
        gen = self.ema_generator()
        with torch.random.fork_rng():
            student = self._heun(gen, gen.denoise, z, cond) if self._student_heun else gen(z, cond)
            teacher_path = self.run_dir / "samples" / "teacher.pt"
            if teacher_path.exists():
                teacher = torch.load(teacher_path).to(self.device)
            else:
                teacher = self._heun(self.teacher, self.teacher, z, cond)
                teacher_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(teacher.cpu(), teacher_path)
            few = None
            if len(gen.sampling_sigmas) > 1 and not self._student_heun:
                few = gen.sample(z, cond, generator=torch.Generator(z.device).manual_seed(0))
        stats = {"sample_mean": float(student.mean()), "sample_std": float(student.std())}
        title, labels = self._grid_labels(len(gen.sampling_sigmas) if few is not None else None)
        panels = [teacher, student] + ([few] if few is not None else [])
        path = self.run_dir / "samples" / f"step{self.step:07d}.png"
        image = None
        codec = latent_codec_of(self.teacher)
        if codec is not None:  # latents are shown as the images the teacher's VAE decodes them to
            panels = [codec.decode(p.to(self.device)).float() for p in panels]
        prompts = self._grid_prompts()
        if student.ndim == 4 and prompts is not None:
            from diffdistill.evaluation.plot import prompt_grid_image

            image = prompt_grid_image(panels, prompts[: student.shape[0]], labels, title)
            save_png(image, path)
        elif student.ndim == 4:
            image = side_by_side_image(panels, labels, title)
            save_png(image, path)
        elif student.ndim == 2:
            image = self._scatter(panels, labels, title, path)
        return stats, image

    def _scatter(self, panels: list[torch.Tensor], labels: list[str], title: str, path: Path):
        """Flat samples as one labelled scatter plot per panel (``d > 2``: projected on the two principal axes of
        the teacher's samples, or of the trained denoiser's in teacher training), saved to ``path``; returns the
        figure as an image."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [p.float().cpu() for p in panels]
        axis = ("x1", "x2")
        if panels[0].shape[1] != 2:  # d > 2: two principal axes of the reference panel, the same for every panel
            # (the teacher's; for teacher training the trained denoiser's, its "teacher" is the fresh network)
            ref = panels[1 if self._student_heun else 0]
            ref = ref[torch.isfinite(ref).all(1)]
            basis = torch.linalg.svd(ref - ref.mean(0), full_matrices=False).Vh[:2].T
            panels = [(p - ref.mean(0)) @ basis for p in panels]
            axis = (f"PC1 of the {'student' if self._student_heun else 'teacher'}'s samples", "PC2")
        fig, ax = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), sharex=True, sharey=True, squeeze=False)
        for a, pts, label in zip(ax[0], panels, labels):
            a.scatter(*pts.T, s=2, alpha=0.5)
            a.set_title(label, fontsize=10)
            a.set_xlabel(axis[0], fontsize=8)
        ax[0][0].set_ylabel(axis[1], fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        image = figure_to_image(fig)
        plt.close(fig)
        return image

    def ema_generator(self, decay: float | None = None) -> nn.Module:
        """The generator with EMA weights (the highest-decay track by default)."""
        if not self.emas:
            return self.accelerator.unwrap_model(self.roles["generator"])
        d = max(self.emas) if decay is None else float(decay)
        return self.emas[d].module

    # ------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train to ``max_steps`` (resuming if configured); returns the last logged scalars.

        Each ``train`` record holds every scalar averaged over the iterations since the previous record (each
        key over the iterations that produced it), plus ``generator_updates``, ``critic_updates`` and
        ``skipped`` counted over that window. SIGTERM or SIGINT finishes the current iteration, writes a
        checkpoint and returns (``self.interrupted`` is then the signal's name); ``trainer.resume=auto`` continues.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main and self.ckpt_dir.exists():
            clean_temporary(self.ckpt_dir)
        self.accelerator.wait_for_everyone()
        resume = self._resume_path()
        if resume is None:
            seed_everything(self.cfg.seed)
            if self.cfg.init_from:
                self.init_from_checkpoint(self.cfg.init_from)
        elif self.cfg.init_from:
            log.info("trainer.init_from=%s ignored: resuming from %s", self.cfg.init_from, resume)
        logger = TrackerLogger(self.run_dir, self.accelerator, self.logger_config, self.run_config)
        last: dict[str, float] = {}
        try:
            if resume is not None:
                self.load_state_dict(load_checkpoint(resume))
                self.last_good_checkpoint = resume
                logger.truncate_after(self.step)
                log.info("resumed from %s at step %d", resume, self.step)
            bar = tqdm(
                total=self.cfg.max_steps,
                initial=self.step,
                desc=f"{self.objective.name}",
                dynamic_ncols=True,
                mininterval=2,
                disable=not self.is_main,
            )
            try:
                with StopSignals() as signals:
                    last = self._loop(logger, bar, signals)
            finally:
                bar.close()
        finally:
            logger.close()
        return last

    def _loop(self, logger: TrackerLogger, bar, signals: StopSignals) -> dict[str, float]:
        """The iterations of :meth:`fit`, with logging, samples, evaluation and checkpoints on schedule (written by
        the main process; the others wait at each checkpoint)."""
        t0 = time.time()
        c = self.cfg
        window = MetricWindow(sum_keys=("generator_updates", "critic_updates", "skipped"))
        shown: dict[str, str] = {"generator_loss": "-", "critic_loss": "-"} if self.critic_roles else {}
        last: dict[str, float] = {}
        end = self.step >= c.max_steps or (c.max_time_s > 0 and self.train_seconds >= c.max_time_s)
        while not end:
            skipped = self.nonfinite["skipped"]
            tic = time.perf_counter()
            logs = self.train_step()
            self.train_seconds += time.perf_counter() - tic
            window.add(
                {
                    **logs,
                    "generator_updates": int("generator_loss" in logs),
                    "critic_updates": int("critic_loss" in logs),
                    "skipped": self.nonfinite["skipped"] - skipped,
                }
            )
            bar.update(1)
            # every process stops at the same iteration: the step budget, the time budget or a signal on any of them
            timed_out = c.max_time_s > 0 and self.train_seconds >= c.max_time_s
            stop = any_true(timed_out or signals.received is not None, self.device)
            end = self.step >= c.max_steps or stop
            if timed_out and self.step < c.max_steps:
                log.info("max_time_s=%g reached at step %d", c.max_time_s, self.step)
            if c.log_every and (self.step % c.log_every == 0 or end):
                rec = {
                    **window.pop(),
                    "sec": time.time() - t0,
                    "train_sec": self.train_seconds,
                    "lr": self.schedulers["generator"].get_last_lr()[0],
                }
                logger.log(self.step, rec)
                # the last known value of each loss: a window without a generator update keeps the previous one
                shown.update({k: f"{v:.3g}" for k, v in rec.items() if k.endswith("_loss")})
                bar.set_postfix(shown, refresh=False)
                last = rec
            if self.is_main and c.sample_every and (self.step % c.sample_every == 0 or end):
                stats, image = self._sample_grid()
                logger.log(self.step, stats, kind="samples")
                if image is not None:
                    logger.log_images(self.step, {"samples": image})
            # every process evaluates its share of the seeds (the evaluator gathers); the main process logs
            if self.evaluator is not None and c.eval_every and (self.step % c.eval_every == 0 or end):
                with torch.random.fork_rng():
                    metrics = self.evaluator(self.ema_generator(), self.step)
                logger.log(self.step, metrics, kind="eval")
            # the end of a run always leaves a checkpoint: its model folders are the run's result
            if (c.checkpoint_every and self.step % c.checkpoint_every == 0) or end:
                self.save_checkpoint()
        if signals.received is not None:
            self.interrupted = signals.received
            log.warning(
                "%s received: stopped after step %d with a checkpoint in %s; continue with trainer.resume=auto",
                signals.received,
                self.step,
                self.ckpt_dir,
            )
        return last


class StopSignals:
    """While active, SIGTERM and SIGINT only set :attr:`received` (the loop then checkpoints and returns); a
    second signal of the same kind stops at once, as usual. Outside the main thread it does nothing."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # asked twice: give up on the graceful stop
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt(f"{name} received twice")
        self.received = name
        log.warning("%s received: finishing this iteration, then writing a checkpoint", name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                num = getattr(signal, name)
                self._previous[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for num, handler in self._previous.items():
            signal.signal(num, handler)
