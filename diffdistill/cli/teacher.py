"""``diffdistill-teacher``: train an EDM teacher on a dataset config (Hydra)."""

from __future__ import annotations

import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffdistill.cli.common import CONFIG_DIR, friendly_errors


@hydra.main(config_path=CONFIG_DIR, config_name="teacher", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from diffdistill.training.teacher import train_teacher

    with friendly_errors():
        dataset = instantiate(cfg.data)
        out = train_teacher(
            OmegaConf.to_container(cfg.model, resolve=True),
            dataset,
            cfg.out_dir,
            export_dir=cfg.export_dir,
            command=" ".join(["diffdistill-teacher", *sys.argv[1:]]),
            **OmegaConf.to_container(cfg.train, resolve=True),
        )
        print(f"teacher written to {out}")


if __name__ == "__main__":
    main()
