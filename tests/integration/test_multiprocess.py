"""Two processes (gloo on CPU, launched by torchrun) train what one process trains with two accumulated
micro-batches: gradients are averaged once per update and role, each process takes its slice of the global batch
with that slice's seeds. Every registered objective is checked; a run with the averaging switched off (the
negative control) must drift apart.

Stated tolerance: the two computations differ only in the order of floating-point additions (an all-reduce mean
vs a sum of halves), so after a few Adam steps the weights agree to 1e-5 (absolute) on the tiny UNet. One process
at batch 2B sees the same data but draws its noise as one micro-batch (one seed for 2B samples instead of one per
slice of B), so it is the same update in distribution, not draw for draw; it is not compared here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffdistill.objectives import OBJECTIVES
from diffdistill.training.builders import build_trainer
from tests.helpers import compose_train

NAMES = sorted(OBJECTIVES)
TOL = 1e-5


def overrides(name: str, run_dir, steps: int, batch: int, accumulation: int) -> list[str]:
    base = [
        f"objective={name}",
        "backbone=tiny_unet",
        "data=synthetic",
        "trainer=tiny",
        "trainer.device=cpu",
        f"run_dir={run_dir}",
        f"trainer.max_steps={steps}",
        f"trainer.batch_size={batch}",
        f"trainer.gradient_accumulation_steps={accumulation}",
        "trainer.sample_every=0",
        "trainer.checkpoint_every=0",
        "logger=none",
        "optim.warmup_steps=0",  # full-rate updates from the first (a warm-up starts at lr 0): drift is visible
    ]
    if compose_train(base).objective.get("distance") == "lpips":
        base.append("objective.distance=l2")
    return base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, names: list[str], *extra: str) -> None:
    worker = Path(__file__).with_name("two_process_worker.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(worker),
        "--out",
        str(out),
        *extra,
        *names,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]


def _single_process(name: str, run_dir: Path, batch: int, accumulation: int) -> dict[str, list[torch.Tensor]]:
    trainer = build_trainer(compose_train(overrides(name, run_dir, 3, batch, accumulation)))
    trainer.fit()
    return {r: [p.detach().clone() for p in trainer.roles[r].parameters()] for r in trainer.objective.roles}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((x - y).abs().max()) for r in a for x, y in zip(a[r], b[r]))


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_proc")
    _torchrun(out, NAMES, "--eval")
    return out


@pytest.mark.parametrize("name", NAMES)
def test_two_processes_equal_gradient_accumulation(name, two_process_runs, tmp_path):
    r0 = torch.load(two_process_runs / f"{name}.rank0.pt")
    r1 = torch.load(two_process_runs / f"{name}.rank1.pt")
    assert r0["world_size"] == r1["world_size"] == 2
    assert _max_diff(r0["weights"], r1["weights"]) == 0.0, "the two processes hold different weights"
    accumulated = _single_process(name, tmp_path / "acc", batch=4, accumulation=2)
    diff = _max_diff(r0["weights"], accumulated)
    assert diff <= TOL, f"two processes vs accumulation: max |difference| {diff:.3g}"


def test_without_gradient_averaging_the_processes_drift_apart(tmp_path):
    """Negative control: the same two-process run with the all-reduce switched off fails the equivalence."""
    _torchrun(tmp_path, ["dmd"], "--no-sync")
    r0 = torch.load(tmp_path / "dmd.rank0.pt")
    r1 = torch.load(tmp_path / "dmd.rank1.pt")
    accumulated = _single_process("dmd", tmp_path / "acc", batch=4, accumulation=2)
    # each process followed its own half of the data: both differ from the synchronised run beyond the tolerance
    assert _max_diff(r0["weights"], r1["weights"]) > 3 * TOL
    assert _max_diff(r0["weights"], accumulated) > 3 * TOL


def test_a_two_process_checkpoint_resumes_in_one_process(two_process_runs):
    """The checkpoint holds the full optimiser state, written once by the main process; a resume at another world
    size continues from it (the same trajectory is guaranteed only at the same world size)."""
    from diffdistill.training.checkpoint import load_checkpoint

    run_dir = two_process_runs / "run_dmd"
    state = load_checkpoint(run_dir)
    assert state["step"] == 3 and state["optimizers"]["generator"]["state"]
    trainer = build_trainer(compose_train([*overrides("dmd", run_dir, 5, 4, 1), "trainer.resume=auto"]))
    trainer.fit()
    assert trainer.step == 5


def test_evaluation_splits_the_seeds_across_processes(two_process_runs):
    """In-loop evaluation: each process generates its share of the per-sample seeds and the set is gathered, so the
    images and the score equal those of one process."""
    from tests.unit.test_eval_harness import _evaluator, _gen, _reference

    ev = _evaluator(_reference(64))
    images, score = ev.generate(_gen()), ev(_gen())
    for rank in (0, 1):
        got = torch.load(two_process_runs / f"eval.rank{rank}.pt")
        assert torch.equal(got["images"], images)
        assert got["score"] == pytest.approx(score, rel=1e-6)
