"""``diffdistill-teacher``: train an EDM teacher through the one trainer, then save it as a teacher model folder.

``configs/teacher.yaml`` is ``configs/train.yaml`` with ``experiment=fashion_mnist/teacher`` (objective ``edm``,
``diffdistill/objectives/edm.py``, on a fresh student network): the run is an ordinary ``diffdistill-train`` run
(same run folder, checkpoints, logs, grids, ``trainer.resume=auto``). At the end the EMA generator's denoiser is
written as a model folder (``export_dir``, default ``<run_dir>/teacher``) that ``Teacher.from_pretrained`` loads.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from diffdistill.cli.common import CONFIG_DIR, friendly_errors


def export_teacher(run_dir: str | Path, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save the denoiser of the run's EMA generator (its latest checkpoint) as a teacher model folder."""
    from diffdistill.models.io import generator_folder, load_generator, model_config, model_extra, save_model

    source = generator_folder(run_dir, ema="auto")
    module = load_generator(source).denoiser
    meta = {k: v for k, v in model_extra(source).items() if k not in ("teacher", "guidance")}  # a student's keys
    meta = {**meta, "role": "teacher", "source": str(source), **(extra or {})}
    return save_model(module, model_config(module), folder, extra=meta)


def run(cfg: DictConfig, command: str | None = None) -> Path:
    """Train ``cfg`` (a ``configs/teacher.yaml`` composition) and export the teacher; returns its folder."""
    from diffdistill.cli.train import run as train
    from diffdistill.objectives.edm import EDMDenoising
    from diffdistill.training.builders import objective_class

    if not issubclass(objective_class(cfg.objective), EDMDenoising):
        raise ValueError(
            f"diffdistill-teacher trains denoisers (objective=edm), not '{cfg.objective._target_}'; "
            "distil with diffdistill-train"
        )
    if OmegaConf.is_interpolation(cfg.student, "denoiser") and "denoiser" not in cfg.backbone:
        raise ValueError(
            "student.denoiser follows backbone.denoiser (a fresh network of the backbone's architecture), but this "
            "backbone has none: choose a backbone with a network config (e.g. backbone=fashion_mnist_unet), give "
            "student.denoiser a _target_ config, or set student.denoiser=null to continue training the teacher"
        )
    train(cfg)
    folder = Path(cfg.export_dir) if cfg.get("export_dir") else Path(cfg.run_dir) / "teacher"
    c = OmegaConf.to_container(cfg, resolve=True)
    recipe = {  # the settings of the recipe (the checkpoint's run_config.json holds the whole config)
        "data": c["data"],
        "steps": c["trainer"]["max_steps"],
        "batch_size": c["trainer"]["batch_size"],
        "optimizer": c["optim"]["name"],
        "lr": c["optim"]["lr"],
        "betas": c["optim"]["betas"],
        "warmup_steps": c["optim"]["warmup_steps"],
        "grad_clip": c["trainer"]["grad_clip"],
        "ema_decays": c["trainer"]["ema_decays"],
        **{k: c["objective"].get(k) for k in ("P_mean", "P_std", "weighting", "label_dropout")},
        "seed": c["trainer"]["seed"],
        "run_dir": str(cfg.run_dir),
        "command": command,
    }
    return export_teacher(cfg.run_dir, folder, recipe)


@hydra.main(config_path=CONFIG_DIR, config_name="teacher", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        out = run(cfg, command=" ".join(["diffdistill-teacher", *sys.argv[1:]]))
        print(f"diffdistill: teacher written to {out} (Teacher.from_pretrained('{out}'), backbone.path={out})")


if __name__ == "__main__":
    main()
