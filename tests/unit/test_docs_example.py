"""docs/adding_an_objective.md stays true: its worked example registers, builds from its config and trains."""

from __future__ import annotations

import re
import sys
import types

import torch
import yaml
from omegaconf import OmegaConf, open_dict

from diffdistill.objectives import OBJECTIVES
from diffdistill.training.builders import build_trainer
from diffdistill.utils.paths import PACKAGE
from tests.helpers import TINY, compose_train

DOC = PACKAGE.parent / "docs" / "adding_an_objective.md"


def test_worked_example_trains_through_the_one_trainer(tmp_path, monkeypatch):
    text = DOC.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    module = types.ModuleType("diffdistill.objectives.ode_regression")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        exec(compile(code, str(DOC), "exec"), module.__dict__)
        assert "ode_regression" in OBJECTIVES
        cfg = compose_train([*TINY, f"run_dir={tmp_path}", "trainer.max_steps=3", "trainer.checkpoint_every=0"])
        with open_dict(cfg):
            cfg.objective = OmegaConf.create(config)
        trainer = build_trainer(cfg)
        before = [p.detach().clone() for p in trainer.roles["generator"].parameters()]
        logs = trainer.fit()
        assert torch.isfinite(torch.tensor(logs["generator_loss"]))
        after = list(trainer.roles["generator"].parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after))
        assert trainer.objective.pass_count().cost() > 1
    finally:
        OBJECTIVES.pop("ode_regression", None)
