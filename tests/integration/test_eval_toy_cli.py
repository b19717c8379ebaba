"""``diffdistill-eval`` on toy runs: distances to the known distribution, written like the image results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from diffdistill import load_generator
from diffdistill.cli.evaluate import compose, data_kind, evaluate
from diffdistill.cli.train import run
from diffdistill.data import GaussianMixtureToy, GaussianToy
from diffdistill.evaluation.toy import evaluate_toy, gaussian_sliced_w2
from tests.helpers import compose_train

TOY = ["experiment=toy/dmd", "trainer.max_steps=20", "trainer.checkpoint_every=10", "trainer.device=cpu"]
EVAL = ["toy.num_samples=2048", "toy.num_projections=64", "plot=false"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("toy_dmd")
    run(compose_train([*TOY, f"run_dir={run_dir}"]))
    return run_dir


def test_eval_of_a_toy_run_scores_against_the_truth(toy_run, capsys):
    out = evaluate(compose([f"run_dir={toy_run}", *EVAL]))
    assert out == toy_run / "eval" / "toy.json"
    doc = json.loads(out.read_text())
    p = doc["protocol"]
    assert p["num_samples"] == 2048 and p["seed_range"] == [0, 2047]
    assert p["sliced_w2"]["num_projections"] == 64 and p["sliced_w2"]["projection_seed"] == 0
    assert p["exact_samples"]["seeds"] == [1_000_000, 1_000_001]
    assert p["distribution"]["class"] == "diffdistill.data.toy.GaussianToy"
    assert p["sampler"]["sampler_steps"] == 1
    floor = p["exact_vs_exact"]
    assert set(floor) == {"mean_error", "cov_error_fro", "cov_error_rel", "sw2"}
    rows = {r["step"]: r for r in doc["results"]}
    assert set(rows) == {10, 20, None}
    assert rows[None]["kind"] == "exact-vs-exact floor" and rows[None]["sw2"] == floor["sw2"]
    for step in (10, 20):
        r = rows[step]
        assert r["checkpoint"].endswith(f"step{step:07d}") and r["ema"] == "0.9" and r["sampler_steps"] == 1
        assert r["sw2"] > 5 * floor["sw2"]  # 20 steps from a = 0.5, b = -0.2: far from N(0.3, 0.8^2)
    # the score of the EMA student is the closed form of its Gaussian (x = a z + b), up to the floor
    gen = load_generator(rows[20]["checkpoint"], ema="0.9")
    a, b = gen.denoiser.a.detach(), gen.denoiser.b.detach()
    ds = GaussianToy()
    dirs = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    closed = gaussian_sliced_w2(b, torch.diag(a**2), ds.true_mean(), ds.true_covariance(), dirs)
    assert rows[20]["sw2"] == pytest.approx(closed, abs=2 * floor["sw2"])
    assert rows[20]["mean_error"] == pytest.approx(float((b - 0.3).norm()), abs=3 * floor["mean_error"])
    printed = capsys.readouterr().out
    assert "exact-vs-exact floor" in printed and "sw2" in printed and "step0000020[ema=0.9]" in printed

    # a second call skips what is there; another protocol refuses to share the file
    evaluate(compose([f"run_dir={toy_run}", *EVAL]))
    assert capsys.readouterr().out.count("skip ") == 2
    with pytest.raises(ValueError, match="different evaluation protocol"):
        evaluate(compose([f"run_dir={toy_run}", "toy.num_samples=2048", "toy.num_projections=32", "plot=false"]))


GMM = [
    "~experiment",
    "backbone=analytic",
    "data=toy_gmm",
    "objective=ict",
    "schedule=toy",
    "eval=none",
    "+student.denoiser={_target_: diffdistill.models.builders.edm_mlp, dim: 2, hidden: 32, depth: 2, sigma_data: 1.42}",
    "trainer.max_steps=10",
    "trainer.checkpoint_every=10",
    "trainer.sample_every=0",
    "trainer.ema_decays=[0.9]",
    "trainer.device=cpu",
]


def test_eval_of_a_mixture_run_reports_mode_coverage(tmp_path):
    """A ``data=toy_gmm`` run (8 modes): mode masses against the true weights, as the library computes them."""
    run_dir = tmp_path / "gmm"
    run(compose_train([*GMM, f"run_dir={run_dir}"]))
    out = evaluate(compose([f"run_dir={run_dir}", "toy.assignment=posterior", *EVAL]))
    doc = json.loads(out.read_text())
    modes = doc["protocol"]["modes"]
    assert modes["num_modes"] == 8 and modes["assignment"] == "posterior" and modes["true_weights"] == [0.125] * 8
    floor = doc["protocol"]["exact_vs_exact"]
    assert floor["modes_covered"] == 8 and floor["mass_error_max"] < 0.03
    row = next(r for r in doc["results"] if r["step"] == 10)
    assert len(row["mode_masses"]) == 8 and sum(row["mode_masses"]) == pytest.approx(1.0)
    assert 0 <= row["modes_covered"] <= 8 and row["sw2"] > floor["sw2"]
    # the CLI's numbers are the library's for the same checkpoint, EMA track and protocol
    gen = load_generator(row["checkpoint"], ema="0.9")
    kw = dict(num_samples=2048, num_projections=64, assignment="posterior")
    ref = evaluate_toy(gen, GaussianMixtureToy(dim=2, num_components=8, radius=2.0, std=0.1), **kw)
    assert {k: row[k] for k in ref.scores} == ref.scores
    assert row["mode_masses"] == ref.modes["masses"]


def test_data_kinds():
    assert data_kind({"_target_": "diffdistill.data.GaussianToy"}) == "known"
    assert data_kind({"_target_": "diffdistill.data.GaussianMixtureToy"}) == "known"
    assert data_kind({"_target_": "diffdistill.data.FashionMNIST", "split": "test"}) == "images"
    assert data_kind({"_target_": "diffdistill.data.SyntheticImages", "num": 4, "resolution": 8}) == "images"


def test_eval_of_data_without_truth_or_images_fails_in_one_line(toy_run, tmp_path):
    """A run whose data has no known distribution and whose samples are vectors: exit 2, one clear line."""
    (tmp_path / "notruth.py").write_text(
        textwrap.dedent(
            """
            from diffdistill.data import GaussianToy

            class NoTruthToy(GaussianToy):
                exact_samples = None  # vectors, distribution unknown to the evaluator
            """
        )
    )
    run_dir = tmp_path / "run"
    shutil.copytree(toy_run / "checkpoints", run_dir / "checkpoints")
    for path in (run_dir / "checkpoints").glob("step*/run_config.json"):  # each checkpoint's run config names the data
        config = json.loads(path.read_text())
        config["data"]["_target_"] = "notruth.NoTruthToy"
        path.write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, "-m", "diffdistill.cli.evaluate", f"run_dir={run_dir}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffdistill: error:")
    assert "no known distribution" in lines[0] and "sample shape (16,)" in lines[0]
    assert not (run_dir / "eval").exists()
