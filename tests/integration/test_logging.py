"""Run logging: window-averaged scalars under a TTUR schedule, the logger group and its trackers."""

import math

import pytest
from hydra.utils import instantiate

from diffdistill.objectives.base import LossOutput
from diffdistill.training.builders import build_trainer
from diffdistill.training.logging import LoggerConfig, read_metrics
from tests.helpers import TINY, compose_train

# DMD with 5 critic updates per generator update: generator updates at iterations 0, 5, 10, ...
TTUR = [*TINY, "objective.critic_steps_per_generator_step=5", "trainer.sample_every=0", "trainer.checkpoint_every=0"]


def _trainer(tmp_path, steps, log_every, extra=()):
    cfg = compose_train(
        [*TTUR, f"run_dir={tmp_path}", f"trainer.max_steps={steps}", f"trainer.log_every={log_every}", *extra]
    )
    return build_trainer(cfg)


def _record_iterations(trainer) -> list[tuple[int, dict]]:
    """Wrap ``train_step`` so each iteration's scalars are kept as ``(step after it, logs)``."""
    seen: list[tuple[int, dict]] = []
    real = trainer.train_step

    def step():
        logs = real()
        seen.append((trainer.step, dict(logs)))
        return logs

    trainer.train_step = step
    return seen


def _window_mean(seen, lo, hi, key):
    vals = [logs[key] for s, logs in seen if lo < s <= hi and key in logs and math.isfinite(logs[key])]
    return sum(vals) / len(vals)


GENERATOR_KEYS = ("generator_loss", "generator_grad_norm", "dm_grad_norm", "dm_sigma_mean")
CRITIC_KEYS = ("critic_loss", "fake_score_grad_norm", "fake_dsm")


def test_generator_scalars_are_averaged_over_the_log_window(tmp_path):
    """5:1 DMD logged every 7 iterations (iterations 6 and 13: never a generator update) keeps generator scalars."""
    tr = _trainer(tmp_path, 14, 7, ["logger=none"])
    seen = _record_iterations(tr)
    last = tr.fit()
    # the premise: neither logging iteration updated the generator
    assert [s for s, logs in seen if "generator_loss" in logs] == [1, 6, 11]
    assert all("generator_loss" not in logs for s, logs in seen if s in (7, 14))
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [7, 14]
    for rec, (lo, hi), n_gen in zip(recs, [(0, 7), (7, 14)], [2, 1]):
        assert rec["generator_updates"] == n_gen and rec["critic_updates"] == 7 and rec["skipped"] == 0
        for key in (*GENERATOR_KEYS, *CRITIC_KEYS):
            assert rec[key] == pytest.approx(_window_mean(seen, lo, hi, key), rel=1e-12, abs=1e-15), key
    # a window mean, not the logging iteration's own value
    assert recs[0]["critic_loss"] != pytest.approx(seen[6][1]["critic_loss"], rel=1e-9)
    assert last["generator_grad_norm"] == recs[-1]["generator_grad_norm"]


def test_skipped_updates_are_counted_and_kept_out_of_the_means(tmp_path):
    """Generator and critic NaN in the same iteration count 2 skips; the means use the finite values only."""
    tr = _trainer(tmp_path, 7, 7, ["logger=none"])
    seen = _record_iterations(tr)
    obj = tr.objective
    real_gen, real_critic = obj.generator_loss, obj.critic_loss

    def nan_at(real, steps):
        def loss(batch, step):
            out = real(batch, step)
            return LossOutput(out.loss * float("nan"), out.logs) if step in steps else out

        return loss

    obj.generator_loss = nan_at(real_gen, {5})
    obj.critic_loss = nan_at(real_critic, {5, 6})
    tr.fit()
    (rec,) = read_metrics(tmp_path / "metrics.jsonl")
    assert rec["skipped"] == 3 and tr.nonfinite["skipped"] == 3
    assert rec["generator_updates"] == 2 and rec["critic_updates"] == 7
    finite = [logs["generator_loss"] for _, logs in seen if math.isfinite(logs.get("generator_loss", math.nan))]
    assert len(finite) == 1 and rec["generator_loss"] == pytest.approx(finite[0], rel=1e-12, abs=1e-15)
    assert rec["critic_loss"] == pytest.approx(_window_mean(seen, 0, 7, "critic_loss"), rel=1e-12)


def test_progress_bar_shows_the_last_known_generator_and_critic_loss(tmp_path, capsys):
    tr = _trainer(tmp_path, 3, 1, ["logger=none"])
    tr.fit()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert "generator_loss" in recs[0] and "generator_loss" not in recs[-1]
    err = capsys.readouterr().err.split("\r")[-1]
    assert f"generator_loss={recs[0]['generator_loss']:.3g}" in err
    assert f"critic_loss={recs[-1]['critic_loss']:.3g}" in err


def test_default_logger_writes_tensorboard_scalars_and_the_labelled_grid(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = _trainer(tmp_path, 4, 2, ["trainer.sample_every=4"])
    tr.fit()
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    jsonl = {r["step"]: r["critic_loss"] for r in read_metrics(tmp_path / "metrics.jsonl")}
    tb = {e.step: e.value for e in ea.Scalars("train/critic_loss")}
    assert tb.keys() == jsonl.keys() == {2, 4}
    assert all(tb[s] == pytest.approx(jsonl[s], rel=1e-6, abs=1e-12) for s in tb)
    (image,) = ea.Images("samples")
    assert image.step == 4 and image.width >= 2 * 512  # teacher | student, each panel upscaled to >= 512 px


def test_logger_none_writes_metrics_jsonl_only(tmp_path):
    tr = _trainer(tmp_path, 2, 1, ["logger=none"])
    assert tr.accelerator.log_with == []
    tr.fit()
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tb").exists()


def test_unknown_tracker_fails_at_start_naming_the_key_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"logger\.trackers.*'tensorbord'.*tensorboard.*wandb"):
        _trainer(tmp_path, 2, 1, ["logger.trackers=[tensorbord]"])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_tracker_without_its_package_says_what_to_install(tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match=r"logger\.trackers: tracker 'tensorboard' needs .*pip install tensorboard"):
        _trainer(tmp_path, 2, 1)


def test_a_tracker_that_fails_to_close_is_a_warning(tmp_path, caplog):
    tr = _trainer(tmp_path, 2, 1)
    (tracker,) = tr.accelerator.log_with
    real_finish = tracker.finish

    def interrupted():
        raise KeyboardInterrupt

    tracker.finish = interrupted
    last = tr.fit()
    real_finish()
    assert last["critic_updates"] == 1
    assert "closing the tensorboard logger failed (KeyboardInterrupt" in caplog.text
    assert tr.accelerator.trackers == []


def test_wandb_option_is_offline_by_default():
    cfg = instantiate(compose_train([*TINY, "logger=wandb"]).logger)
    assert isinstance(cfg, LoggerConfig)
    assert cfg.trackers == ["wandb"] and cfg.init_kwargs == {"wandb": {"mode": "offline"}}
