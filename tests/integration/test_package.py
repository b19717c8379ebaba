"""The package as a user gets it: a built wheel that carries its configs, modules that import on their own,
the public API, the console scripts from an empty folder, and Hydra sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import diffdistill
from diffdistill.utils.paths import ASSETS, CONFIG_DIR, PACKAGE

REPO = PACKAGE.parent


def _modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for p in PACKAGE.rglob("*.py")
    )


def test_every_module_imports_on_its_own():
    """Each module imported first in a clean module table (one interpreter; torch stays loaded): no import cycle."""
    code = (
        "import importlib, sys, json\n"
        "failed = {}\n"
        f"for m in {_modules()!r}:\n"
        "    for k in [k for k in sys.modules if k == 'diffdistill' or k.startswith('diffdistill.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        failed[m] = repr(e)\n"
        "print(json.dumps(failed))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


def test_public_api():
    assert diffdistill.__file__ is not None  # a regular package, not an implicit namespace package
    assert diffdistill.__version__ and diffdistill.__version__[0].isdigit()
    from importlib.metadata import version

    assert version("diffdistill") == diffdistill.__version__
    assert callable(diffdistill.load_generator)
    assert "dmd" in diffdistill.OBJECTIVES
    assert diffdistill.Teacher.from_pretrained is not None
    with pytest.raises(AttributeError):
        _ = diffdistill.not_a_name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("diffdistill-*.whl")
    return whl


def test_wheel_holds_every_config_and_the_packaged_teacher(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {str(p.relative_to(REPO)) for p in CONFIG_DIR.rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)[:5]
    assets = {str(p.relative_to(REPO)) for p in ASSETS.rglob("*") if p.is_file()}
    assert "diffdistill/assets/teachers/fashion_mnist/model.safetensors" in assets
    assert assets <= names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    for cmd in ("diffdistill-train", "diffdistill-eval", "diffdistill-teacher", "diffdistill-export"):
        assert cmd in scripts


def _from_unpacked(wheel: Path, tmp_path: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """Run a console-script module from an empty folder with the unpacked wheel first on the path."""
    site = tmp_path / "site"
    if not site.exists():
        zipfile.ZipFile(wheel).extractall(site)
    cwd = tmp_path / "empty"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import sys, diffdistill; print('PACKAGE', diffdistill.__file__, file=sys.stderr); "
        f"sys.argv = ['x', *{list(args)!r}]; from {module} import main; main()"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env)


def test_console_scripts_run_from_an_empty_folder_against_the_wheel(wheel, tmp_path):
    res = _from_unpacked(wheel, tmp_path, "diffdistill.cli.train", "experiment=toy/dmd", "trainer.max_steps=20")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"PACKAGE {tmp_path / 'site'}" in res.stderr  # the wheel's copy ran, not the checkout
    (run,) = (tmp_path / "empty" / "runs" / "toy_dmd").iterdir()
    assert (run / "checkpoints" / "LATEST").exists() and (run / "metrics.jsonl").exists()
    res = _from_unpacked(wheel, tmp_path, "diffdistill.cli.train", "--cfg", "job", "objective=cd")
    assert res.returncode == 0 and "ConsistencyDistillation" in res.stdout, res.stderr[-2000:]
    for module in (
        "diffdistill.cli.train",
        "diffdistill.cli.evaluate",
        "diffdistill.cli.teacher",
        "diffdistill.cli.export",
    ):
        res = _from_unpacked(wheel, tmp_path, module, "--help")
        assert res.returncode == 0 and "Powered by Hydra" in res.stdout, (module, res.stderr[-2000:])


def _train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from diffdistill.cli.train import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_a_sweep_gives_each_job_its_own_folder(tmp_path):
    lrs = "1e-3,1e-2,1e-1,1.0"
    res = _train("-m", "experiment=toy/dmd", "trainer.max_steps=10", f"optim.lr={lrs}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (sweep,) = (tmp_path / "runs" / "toy_dmd").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        assert (job / "checkpoints" / "LATEST").exists() and (job / "metrics.jsonl").exists()
        seen.add(float(next(ln for ln in (job / "config.yaml").read_text().splitlines() if "  lr:" in ln).split()[1]))
    assert seen == {1e-3, 1e-2, 1e-1, 1.0}
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_sweep_over_a_missing_key_fails_cleanly(tmp_path):
    res = _train("-m", "experiment=toy/dmd", "optim.lrr=1,2", cwd=tmp_path)
    assert res.returncode != 0
    assert "optim.lrr" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics.jsonl"))


def test_a_run_folder_is_never_reused(tmp_path):
    args = ("experiment=toy/dmd", "trainer.max_steps=5", f"run_dir={tmp_path / 'run'}")
    assert _train(*args, cwd=tmp_path).returncode == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    res = _train(*args, cwd=tmp_path)
    assert res.returncode == 2 and "already holds a run" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_no_test_asserts_wall_clock_time():
    """Speed is measured in benchmarks/, never asserted in a test (a loaded CI machine makes such tests flaky)."""
    import re

    pattern = re.compile(r"assert[^\n]*(time\.time\(\)|perf_counter\(\)|monotonic\(\))")
    offenders = [str(p) for p in (REPO / "tests").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == [], offenders


def test_the_default_demo_runs_with_the_network_blocked(tmp_path):
    """The README's default job (the packaged teacher, Fashion-MNIST from the Debian package), a few iterations, in a
    process whose sockets refuse anything off the machine (tests/_netblock): nothing is downloaded."""
    from diffdistill.data.fashion_mnist import FashionMNIST

    try:
        FashionMNIST(limit=8)
    except FileNotFoundError:
        pytest.skip("the Fashion-MNIST files (Debian package dataset-fashion-mnist) are not installed")
    assert "_netblock" in os.environ["PYTHONPATH"]
    res = _train("trainer.max_steps=3", "trainer.sample_every=3", "trainer.num_grid_samples=4", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (run,) = (tmp_path / "runs" / "fashion_mnist_dmd").iterdir()
    assert (run / "checkpoints" / "LATEST").exists() and list((run / "samples").glob("step*.png"))
    # it ends with the student exported as a diffusers pipeline, which loads and samples (the README's lines)
    from diffdistill.export import DiffDistillPipeline

    pipe = DiffDistillPipeline.from_pretrained(run / "pipeline")
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()
