"""Shared test helpers: Hydra composition of the train config."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffdistill.cli.common import CONFIG_DIR


def compose_train(overrides: list[str], config_name: str = "train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=False)


TINY = ["~experiment", "backbone=tiny_unet", "data=synthetic", "trainer=tiny", "trainer.device=cpu"]
