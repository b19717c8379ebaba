"""The objective contract, checked for every registered objective (enumerated from the registry).

A new objective file is picked up here without editing this test: it must compose from the CLI by
``objective=<name>`` alone (the default experiment's private settings never leak into it), train on the
tiny UNet, write checkpoints, grids and logs, resume bit for bit, and send gradients only into the
parameters of the roles it declares for each update.
"""

from __future__ import annotations

import json

import pytest
import torch

from diffdistill import load_generator
from diffdistill.cli.train import run
from diffdistill.objectives import OBJECTIVES
from diffdistill.training.builders import build_trainer
from diffdistill.training.checkpoint import load_checkpoint
from tests.helpers import compose_train, state_equal

NAMES = sorted(OBJECTIVES)
# the default experiment stays selected: choosing the objective must be enough
TINY_DEFAULT_EXPERIMENT = ["backbone=tiny_unet", "data=synthetic", "trainer=tiny", "trainer.device=cpu"]


def _overrides(name: str, run_dir, steps: int, extra=()) -> list[str]:
    base = [f"objective={name}", *TINY_DEFAULT_EXPERIMENT, f"run_dir={run_dir}", f"trainer.max_steps={steps}"]
    cfg = compose_train(base)
    # a perceptual distance needs user-supplied network weights (never downloaded): use l2 in the smoke run
    if cfg.objective.get("distance") == "lpips":
        base.append("objective.distance=l2")
    return [*base, *extra]


def test_registry_is_complete():
    """Every objective module registers with a paper and a config file of its name."""
    from diffdistill.utils.paths import CONFIG_DIR

    assert NAMES, "no objective registered"
    for name, cls in OBJECTIVES.items():
        assert cls.name == name
        assert cls.paper is not None and cls.paper.arxiv, name
        assert (CONFIG_DIR / "objective" / f"{name}.yaml").exists(), f"configs/objective/{name}.yaml missing"
        assert set(cls.generator_roles) <= set(cls.roles), name


@pytest.mark.parametrize("name", NAMES)
def test_objective_composes_alone_and_trains(name, tmp_path):
    """``objective=<name>`` on top of the default experiment: trains, logs, samples, checkpoints, reloads."""
    run(compose_train(_overrides(name, tmp_path, 2)))
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in recs if r["kind"] == "train" for k, v in r.items() if k.endswith("_loss")]
    assert losses and all(isinstance(v, float) for v in losses)  # non-finite values are logged as strings
    assert (tmp_path / "checkpoints" / "LATEST").exists()
    assert list((tmp_path / "samples").glob("step*.png"))
    gen = load_generator(tmp_path / "checkpoints" / "last")
    assert gen(torch.randn(2, 1, 8, 8)).shape == (2, 1, 8, 8)


def test_lpips_without_weights_says_what_to_supply(tmp_path):
    """CD's paper distance is LPIPS, whose weights are never downloaded: the run says which key to set."""
    cfg = compose_train(["objective=cd", *TINY_DEFAULT_EXPERIMENT, f"run_dir={tmp_path}"])
    assert cfg.objective.distance == "lpips"
    with pytest.raises(ValueError, match="lpips_weights"):
        build_trainer(cfg)


@pytest.mark.parametrize("name", NAMES)
def test_objective_resumes_bit_for_bit(name, tmp_path):
    """4 iterations == 2 + resume + 2, for every module, optimiser, EMA track, data position and RNG."""
    extra = ["trainer.checkpoint_every=2", "trainer.sample_every=0"]
    build_trainer(compose_train(_overrides(name, tmp_path / "full", 4, extra))).fit()
    build_trainer(compose_train(_overrides(name, tmp_path / "half", 2, extra))).fit()
    build_trainer(compose_train(_overrides(name, tmp_path / "half", 4, [*extra, "trainer.resume=auto"]))).fit()
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last")
    b = load_checkpoint(tmp_path / "half" / "checkpoints" / "last")
    assert a["step"] == b["step"] == 4
    for key in ("roles", "optimizers", "ema", "data", "objective_state"):
        assert state_equal(a[key], b[key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_only_the_updated_roles(name, tmp_path):
    """After each backward, only trainable parameters of the roles being updated hold gradients: never the
    teacher's, never a frozen role's, never the other side's (critic vs generator)."""
    trainer = build_trainer(compose_train(_overrides(name, tmp_path, 6, ["trainer.checkpoint_every=0"])))
    owner = {}
    for role, module in trainer.roles.items():
        for p in module.parameters():
            owner.setdefault(p, role)
    for p in trainer.teacher.parameters():
        owner.setdefault(p, "teacher")
    seen: list[tuple[tuple[str, ...], set[str]]] = []
    updating: list[tuple[str, ...]] = []
    orig_update, orig_backward = trainer._update, trainer.accelerator.backward

    def update(names, *args):
        updating.append(tuple(names))
        return orig_update(names, *args)

    def backward(loss, **kw):
        orig_backward(loss, **kw)
        with_grad = {owner.get(p, "?") for p in owner if p.grad is not None and p.grad.abs().sum() > 0}
        seen.append((updating[-1], with_grad))

    trainer._update, trainer.accelerator.backward = update, backward
    trainer.fit()
    assert seen, "no update ran"
    for names, roles in seen:
        assert roles <= set(names), f"update of {names} put gradients into {sorted(roles - set(names))}"
    # (one update may be exactly zero, e.g. DMD's first: the fake score starts equal to the teacher)
    # a critic may be idle during a warm-up (rCM), but every role that was updated got a gradient at some point
    reached = {r for _, roles in seen for r in roles}
    updated = {r for names, _ in seen for r in names}
    assert "generator" in reached and reached == updated, f"roles {sorted(updated - reached)} got no gradient"
    assert updated <= set(OBJECTIVES[name].roles)


@pytest.mark.parametrize("name", NAMES)
def test_student_loads_alone_from_its_model_folder(name, tmp_path):
    """Every checkpoint holds the generator and each EMA track as model folders that rebuild the student with no
    dataset, objective, trainer or loss network: loaded in a fresh interpreter where those packages cannot even
    be imported, it computes what the trained student computes."""
    import subprocess
    import sys

    trainer = build_trainer(compose_train(_overrides(name, tmp_path, 2, ["trainer.ema_decays=[0.5]"])))
    trainer.fit()
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    torch.save({"z": z, "labels": labels}, tmp_path / "inputs.pt")
    expected = {}
    with torch.no_grad():
        from diffdistill.models.conditioning import Conditioning

        for track, module in (("generator", trainer.roles["generator"]), ("ema_0.5", trainer.emas[0.5].module)):
            expected[track] = module.eval()(z, Conditioning(class_labels=labels))
    code = f"""
import sys, torch
for blocked in ("diffdistill.data", "diffdistill.objectives", "diffdistill.training", "lpips"):
    sys.modules[blocked] = None  # importing any of them now fails
from diffdistill import load_generator
from diffdistill.models.conditioning import Conditioning
inputs = torch.load({str(tmp_path / "inputs.pt")!r})
out = {{}}
for track, ema in (("generator", None), ("ema_0.5", 0.5)):
    gen = load_generator({str(tmp_path)!r}, ema=ema)
    with torch.no_grad():
        out[track] = gen(inputs["z"], Conditioning(class_labels=inputs["labels"]))
torch.save(out, {str(tmp_path / "out.pt")!r})
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for track in expected:
        torch.testing.assert_close(got[track], expected[track], rtol=0, atol=1e-6)
