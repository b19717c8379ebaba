"""The one training loop: toy convergence, bit-exact resume, update counts, non-finite handling."""

import json

import pytest
import torch

from diffdistill import load_generator
from diffdistill.cli.train import run
from diffdistill.objectives.base import LossOutput
from diffdistill.training.builders import build_trainer
from diffdistill.training.checkpoint import load_checkpoint
from diffdistill.training.trainer import NonFiniteError
from tests.helpers import TINY, compose_train, state_equal


def test_dmd_toy_run_reaches_true_distribution(tmp_path):
    """experiment=toy/dmd: one-step samples of N(0.3, 0.8^2) in 16-d within 0.03 in mean and std."""
    cfg = compose_train(["experiment=toy/dmd", f"run_dir={tmp_path}", "trainer.device=cpu"])
    run(cfg)
    gen = load_generator(tmp_path / "checkpoints" / "last", ema=None)
    with torch.no_grad():
        x = gen(torch.randn(20000, 16, generator=torch.Generator().manual_seed(0)))
    assert x.mean(0).sub(0.3).abs().max().item() < 0.03
    assert x.std(0).sub(0.8).abs().max().item() < 0.03
    cov = torch.cov(x.T)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max().item() < 0.03
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "metrics.jsonl").exists()


def _toy(tmp_path, steps, extra=(), base=("experiment=toy/dmd",)):
    return compose_train(
        [
            *base,
            f"run_dir={tmp_path}",
            "trainer.device=cpu",
            f"trainer.max_steps={steps}",
            "trainer.checkpoint_every=5",
            "trainer.log_every=1",
            *extra,
        ]
    )


TINY_RESUME = (*TINY, "objective.critic_steps_per_generator_step=2", "trainer.sample_every=3")


@pytest.mark.parametrize("base", [("experiment=toy/dmd",), TINY_RESUME], ids=["toy", "tiny_unet"])
def test_resume_continues_the_same_trajectory(tmp_path, base):
    """N steps + resume + N steps == 2N steps, bit for bit (toy and tiny UNet)."""
    full = build_trainer(_toy(tmp_path / "full", 10, base=base))
    full.fit()
    half = build_trainer(_toy(tmp_path / "half", 5, base=base))
    half.fit()
    resumed = build_trainer(_toy(tmp_path / "half", 10, ["trainer.resume=auto"], base=base))
    resumed.fit()
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last")
    b = load_checkpoint(tmp_path / "half" / "checkpoints" / "last")
    assert a["step"] == b["step"] == 10
    for key in ("roles", "optimizers", "ema", "data"):
        assert state_equal(a[key], b[key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # the training log of the resumed run equals the uninterrupted one (train records; wall time aside)
    assert _train_records(tmp_path / "full") == _train_records(tmp_path / "half")


def _train_records(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("sec", "train_sec")} for r in recs if r["kind"] == "train"]


def test_time_budget_stops_checkpoints_and_survives_resume(tmp_path):
    """trainer.max_time_s ends the run early with a final log, grid and checkpoint; a resume keeps the count."""
    once = ["trainer.max_time_s=0.5", "trainer.checkpoint_every=1000000", "trainer.sample_every=0"]
    cfg = _toy(tmp_path, 10**6, once)
    trainer = build_trainer(cfg)
    trainer.fit()
    first = load_checkpoint(tmp_path / "checkpoints" / "last")
    assert 0 < first["step"] < 10**6 and first["train_seconds"] >= 0.5
    assert first["train_seconds"] < 0.5 + 1.0  # stops within an iteration or so of the budget
    resumed = build_trainer(_toy(tmp_path, 10**6, ["trainer.max_time_s=1.0", "trainer.resume=auto"]))
    assert resumed.train_seconds == 0.0
    resumed.fit()
    second = load_checkpoint(tmp_path / "checkpoints" / "last")
    assert second["step"] > first["step"] and 1.0 <= second["train_seconds"] < 2.0
    # no further iteration when the budget is already spent
    again = build_trainer(_toy(tmp_path, 10**6, ["trainer.max_time_s=1.0", "trainer.resume=auto"]))
    again.fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "last")["step"] == second["step"]


def test_ttur_update_counts(tmp_path):
    """With ratio 5, 23 iterations give ceil(23/5) = 5 generator and 23 fake-score optimiser steps."""
    tr = build_trainer(_toy(tmp_path, 23))
    tr.fit()
    steps = {k: max(int(s["step"]) for s in o.state.values()) for k, o in tr.optimizers.items()}
    assert steps == {"generator": 5, "fake_score": 23}


def test_nonfinite_loss_is_skipped_then_stops(tmp_path, caplog):
    tr = build_trainer(_toy(tmp_path, 30, ["trainer.max_nonfinite_streak=3"]))
    real = tr.objective.generator_loss
    calls = {"n": 0}

    def poisoned(batch, step):
        out = real(batch, step)
        calls["n"] += 1
        if calls["n"] == 2:  # one NaN: skipped, weights untouched
            return LossOutput(out.loss * float("nan"), out.logs)
        if calls["n"] >= 4:  # persistent NaN: the run stops with an actionable error
            return LossOutput(out.loss * float("nan"), out.logs)
        return out

    tr.objective.generator_loss = poisoned
    before = None
    with pytest.raises(NonFiniteError, match="consecutive non-finite"):
        for _ in range(30):
            if calls["n"] == 1 and before is None:
                before = {k: v.clone() for k, v in tr.roles["generator"].state_dict().items()}
            tr.train_step()
            if calls["n"] == 2:
                after = tr.roles["generator"].state_dict()
                assert all(torch.equal(before[k], after[k]) for k in before)
    assert tr.nonfinite["skipped"] >= 4
    assert "non-finite generator loss" in caplog.text


def test_tiny_unet_run_writes_samples_and_checkpoints(tmp_path):
    cfg = compose_train([*TINY, f"run_dir={tmp_path}"])
    run(cfg)
    assert sorted(p.name for p in (tmp_path / "samples").glob("step*.png")) == ["step0000002.png", "step0000004.png"]
    assert (tmp_path / "checkpoints" / "LATEST").exists()
    gen = load_generator(tmp_path / "checkpoints" / "last")
    assert gen(torch.randn(2, 1, 8, 8)).shape == (2, 1, 8, 8)
