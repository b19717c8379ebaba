"""Faults a long run meets: a stop signal, a kill in the middle of a checkpoint write, a full disk, non-finite
batches, losses and gradients. Each is survived with nothing lost beyond the interrupted iteration, no checkpoint
that loads as valid is ever wrong, and the user gets one clear line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffdistill.models.io import latest_checkpoint
from diffdistill.objectives.base import LossOutput
from diffdistill.training.builders import build_trainer
from diffdistill.training.checkpoint import CheckpointError, load_checkpoint, newest_valid_checkpoint
from diffdistill.training.trainer import NonFiniteError
from tests.helpers import compose_train

TOY = ["experiment=toy/dmd", "trainer.device=cpu", "logger=none"]


def _toy(run_dir: Path, steps: int, *extra: str):
    return compose_train([*TOY, f"run_dir={run_dir}", f"trainer.max_steps={steps}", *extra])


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_and_exits_cleanly(sig, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TOY,
        f"run_dir={run_dir}",
        "trainer.max_steps=1000000",
        "trainer.checkpoint_every=0",
        "trainer.log_every=5",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from diffdistill.cli.train import main; main()", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while len(_records(run_dir)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"{sig.name} received" in err and "trainer.resume=auto" in err and "Traceback" not in err
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    stopped = load_checkpoint(ckpt)["step"]
    assert stopped >= 15  # every finished iteration is in the checkpoint
    # continue: the run picks up where it stopped
    trainer = build_trainer(_toy(run_dir, stopped + 5, "trainer.resume=auto"))
    trainer.fit()
    assert trainer.step == stopped + 5


KILLER = """
import os, signal, sys
from pathlib import Path
import diffdistill.training.checkpoint as ck
calls = {"n": 0}
where, at, latest = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
def killing(real):
    def wrapped(*a, **k):
        if latest.exists():  # count calls once the first checkpoint is complete
            calls["n"] += 1
            if calls["n"] == at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return wrapped
setattr(ck, where, killing(getattr(ck, where)))
from diffdistill.cli.train import main
sys.argv = ["x", *sys.argv[4:]]
main()
"""


@pytest.mark.parametrize(
    "where,at",
    [("write_model_files", 1), ("write_model_files", 3), ("_sha256", 5), ("atomic_write_text", 1)],
    ids=["models-1", "models-2", "manifest", "before-LATEST"],
)
def test_kill_during_a_checkpoint_write_never_leaves_a_wrong_checkpoint(where, at, tmp_path):
    """SIGKILL at points inside the second checkpoint's write: the next start cleans the temp files and resumes from
    the newest checkpoint that verifies (the new one when it was complete, even before LATEST named it)."""
    run_dir = tmp_path / "run"
    args = [*TOY, f"run_dir={run_dir}", "trainer.max_steps=12", "trainer.checkpoint_every=4"]
    latest = run_dir / "checkpoints" / "LATEST"
    res = subprocess.run(
        [sys.executable, "-c", KILLER, where, str(at), str(latest), *args], capture_output=True, text=True
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    ckpts = run_dir / "checkpoints"
    found, rejected = newest_valid_checkpoint(ckpts)
    assert found is not None and not rejected  # a folder is only ever in place once complete
    for p in ckpts.glob("step*"):
        load_checkpoint(p)  # every checkpoint folder present verifies
    trainer = build_trainer(_toy(run_dir, 12, "trainer.checkpoint_every=4", "trainer.resume=auto"))
    trainer.fit()
    assert not list(ckpts.glob(".*.tmp*")), "temporary files of the killed write were not cleaned up"
    assert trainer.step == 12
    if where == "atomic_write_text":  # killed after the rename, before LATEST: the complete step-8 folder is used
        assert found.name == "step0000008"


def test_a_corrupt_newest_checkpoint_falls_back_to_an_intact_one(tmp_path, caplog):
    run_dir = tmp_path / "run"
    build_trainer(_toy(run_dir, 8, "trainer.checkpoint_every=4")).fit()
    newest = run_dir / "checkpoints" / "step0000008"
    weights = newest / "generator" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    trainer = build_trainer(_toy(run_dir, 10, "trainer.checkpoint_every=4", "trainer.resume=auto"))
    trainer.fit()
    assert "does not match its checksum" in caplog.text and "step0000004" in caplog.text
    assert trainer.step == 10
    # nothing that verifies: refuse rather than start afresh over the run
    for p in (run_dir / "checkpoints").glob("step*"):
        (p / "manifest.json").write_text("{broken")
    with pytest.raises(ValueError, match="refusing to start afresh"):
        build_trainer(_toy(run_dir, 12, "trainer.resume=auto")).fit()


def test_disk_full_while_saving_is_one_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import diffdistill.training.checkpoint as ck

    run_dir = tmp_path / "run"
    build_trainer(_toy(run_dir, 4, "trainer.checkpoint_every=4")).fit()
    real = ck.write_model_files

    def full(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "write_model_files", full)
    trainer = build_trainer(_toy(run_dir, 8, "trainer.checkpoint_every=4", "trainer.resume=auto"))
    with pytest.raises(CheckpointError, match="the disk is full") as err:
        trainer.fit()
    assert "\n" not in str(err.value)
    assert load_checkpoint(run_dir / "checkpoints" / "step0000004")["step"] == 4
    assert not (run_dir / "checkpoints" / "step0000008").exists()
    assert not list((run_dir / "checkpoints").glob(".*.tmp*"))


def test_disk_full_from_the_cli_is_one_line(tmp_path):
    code = (
        "import errno, diffdistill.training.checkpoint as ck\n"
        "def full(*a, **k):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "ck.write_model_files = full\n"
        "from diffdistill.cli.train import main\nmain()\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *TOY, f"run_dir={tmp_path / 'run'}", "trainer.max_steps=4"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("diffdistill: error:")][0].count("disk is full")


def _finite(trainer) -> bool:
    tensors = [p for m in trainer.roles.values() for p in m.parameters()]
    tensors += [
        v for o in trainer.optimizers.values() for s in o.state.values() for v in s.values() if torch.is_tensor(v)
    ]
    return all(torch.isfinite(t).all() for t in tensors)


@pytest.mark.parametrize("where", ["batch", "loss", "gradient"])
def test_a_nonfinite_batch_loss_or_gradient_is_skipped_and_logged(where, tmp_path, caplog):
    trainer = build_trainer(_toy(tmp_path / "run", 12, "trainer.checkpoint_every=0", "trainer.log_every=1"))
    state = {"n": 0}
    if where == "batch":
        real_get = trainer.dataset.get

        def get(idx):
            state["n"] += 1
            batch = real_get(idx)
            if state["n"] == 6:
                batch.x0[0, 0] = float("nan")
            return batch

        trainer.dataset.get = get
        trainer.objective.critic_loss = _poison_with_data(trainer.objective.critic_loss)
    elif where == "loss":
        real = trainer.objective.critic_loss

        def critic_loss(batch, step):
            out = real(batch, step)
            return LossOutput(out.loss * float("nan"), out.logs) if step == 5 else out

        trainer.objective.critic_loss = critic_loss
    else:
        p = next(trainer.roles["fake_score"].parameters())
        p.register_hook(lambda g: g * float("inf") if trainer.step == 5 else g)
    trainer.fit()
    assert trainer.nonfinite["skipped"] >= 1 and "skipped" in caplog.text
    assert _finite(trainer)
    recs = [r for r in _records(tmp_path / "run") if r["kind"] == "train"]
    assert sum(r["skipped"] for r in recs) == trainer.nonfinite["skipped"]


def _poison_with_data(critic_loss):
    """The DMD toy's critic reads no real data: make the NaN of the batch reach its loss."""

    def wrapped(batch, step):
        out = critic_loss(batch, step)
        if batch.x0 is not None and not torch.isfinite(batch.x0).all():
            return LossOutput(out.loss + batch.x0.flatten(1).sum(1), out.logs)
        return out

    return wrapped


def test_a_persistent_streak_stops_naming_a_checkpoint_that_exists(tmp_path):
    run_dir = tmp_path / "run"
    trainer = build_trainer(
        _toy(run_dir, 40, "trainer.checkpoint_every=2", "trainer.keep_checkpoints=1", "trainer.max_nonfinite_streak=6")
    )
    real = trainer.objective.critic_loss

    def critic_loss(batch, step):
        out = real(batch, step)
        return LossOutput(out.loss * float("nan"), out.logs) if step >= 5 else out

    trainer.objective.critic_loss = critic_loss
    with pytest.raises(NonFiniteError) as err:
        trainer.fit()
    message = str(err.value)
    good = run_dir / "checkpoints" / "step0000004"
    assert str(good) in message and good.exists()  # not rotated out by the checkpoints written during the streak
    assert load_checkpoint(good)["step"] == 4
    assert _finite(trainer)


def test_checkpoints_are_readable_by_the_run_folders_other_users(tmp_path):
    build_trainer(_toy(tmp_path / "run", 2, "trainer.checkpoint_every=2")).fit()
    for p in (tmp_path / "run" / "checkpoints").rglob("*"):
        mode = p.stat().st_mode & 0o777
        assert mode & 0o044 == 0o044, (p, oct(mode))
    assert os.access(tmp_path / "run" / "checkpoints" / "LATEST", os.R_OK)
