"""Fuzzing one config override at a time: a value either runs, or fails when the run is built with one clean line
that names the key; never a traceback from inside torch, diffusers or Hydra's internals, never a hang."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffdistill.training.builders import build_trainer
from diffdistill.training.checkpoint import CheckpointError
from tests.helpers import TINY, compose_train

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BASE = [*TINY, "logger=none", "trainer.sample_every=0", "trainer.checkpoint_every=0"]
VALUES = ["-1", "0", "1", "-0.5", "0.5", "1e9", "-1e9", "nan", "abc", "null", "true", "[1,2]", "[]", "{}", "''"]
CLEAN = (ValueError, FileNotFoundError, FileExistsError, KeyError, CheckpointError)


def _leaf_keys() -> list[str]:
    cfg = compose_train(BASE)
    keys = []
    for group in ("trainer", "optim", "objective", "student", "data"):
        container = OmegaConf.to_container(cfg[group], resolve=False)
        for k, v in container.items():
            if not k.startswith("_") and not isinstance(v, dict):
                keys.append(f"{group}.{k}")
    return sorted(set(keys) - {"trainer.max_steps", "trainer.resume"})


KEYS = _leaf_keys()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=st.sampled_from(VALUES))
def test_one_override_runs_or_fails_cleanly_naming_the_key(key, value, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fuzz")
    leaf = key.rsplit(".", 1)[1]
    try:
        cfg = compose_train([*BASE, f"run_dir={run_dir}", "trainer.max_steps=1", f"{key}={value}"])
    except (ConfigCompositionException, HydraException, OmegaConfBaseException) as e:
        assert leaf in str(e), f"{key}={value}: composition error does not name the key: {e}"
        return
    try:
        build_trainer(cfg).fit()
    except CLEAN as e:
        message = str(e)
        assert "\n" not in message.strip(), f"{key}={value}: not one line: {message}"
        # a value that clashes with another setting may be named through its group (e.g. the data group's size)
        group = key.split(".", 1)[0]
        named = leaf in message or key in message or f"({group} group)" in message
        assert named, f"{key}={value}: the error does not name the key: {message}"
