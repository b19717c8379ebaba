"""``diffdistill-train``: compose backbone, schedule, objective, data, optim, trainer, eval (Hydra) and train."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from diffdistill.cli.common import CONFIG_DIR, friendly_errors

log = logging.getLogger("diffdistill")


def run(cfg: DictConfig) -> dict:
    """Build everything from ``cfg`` and train; returns the last logged scalars."""
    from pathlib import Path

    from diffdistill.training.builders import build_evaluator, build_trainer

    run_dir = Path(cfg.run_dir)
    if cfg.trainer.get("resume") is None and any((run_dir / f).exists() for f in ("config.yaml", "metrics.jsonl")):
        raise FileExistsError(
            f"run folder '{run_dir}' already holds a run; pass trainer.resume=auto to continue it or choose another "
            "run_dir (nothing was overwritten)"
        )
    trainer = build_trainer(cfg, evaluator=build_evaluator(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    last = trainer.fit()
    if trainer.interrupted:
        print(
            f"diffdistill: {trainer.interrupted} received: stopped at step {trainer.step} with a checkpoint; "
            f"continue with: diffdistill-train ... run_dir={run_dir} trainer.resume=auto",
            file=sys.stderr,
        )
        return last
    if cfg.get("export_pipeline") and trainer.is_main:
        from diffdistill.export import export

        result = export(run_dir, run_dir / "pipeline", overwrite=True)
        print(f"diffdistill: {result.pipeline_class} written to {result.path} (load it with from_pretrained)")
    log.info("run finished: %s", run_dir)
    print(f"diffdistill: run folder {run_dir} (samples/, checkpoints/, metrics.jsonl, config.yaml)")
    return last


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        run(cfg)


if __name__ == "__main__":
    main()
