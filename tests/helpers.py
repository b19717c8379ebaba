"""Shared test helpers: Hydra composition of the train config."""

from __future__ import annotations

from diffdistill.cli.common import compose_config


def compose_train(overrides: list[str], config_name: str = "train"):
    return compose_config(overrides, config_name)


TINY = ["~experiment", "backbone=tiny_unet", "data=synthetic", "trainer=tiny", "trainer.device=cpu"]
