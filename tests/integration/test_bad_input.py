"""Bad input gets one clear error and never overwrites what is on disk."""

import gzip
import subprocess
import sys

import pytest
import torch

from diffdistill.cli.train import run
from diffdistill.data.fashion_mnist import FashionMNIST, read_idx
from diffdistill.models import Teacher
from diffdistill.training.checkpoint import atomic_save, load_checkpoint
from tests.helpers import TINY, compose_train


def test_existing_run_folder_is_not_overwritten(tmp_path):
    run(compose_train([*TINY, f"run_dir={tmp_path}"]))
    ckpt = tmp_path / "checkpoints" / "last.pt"
    before = ckpt.read_bytes()
    with pytest.raises(FileExistsError, match="resume=auto"):
        run(compose_train([*TINY, f"run_dir={tmp_path}"]))
    assert ckpt.read_bytes() == before


def test_corrupt_and_missing_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(bad)
    atomic_save({"weights": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a diffdistill checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(compose_train([*TINY, f"run_dir={tmp_path / 'r'}", f"trainer.resume={tmp_path / 'missing.pt'}"]))


def test_missing_teacher_and_dataset():
    with pytest.raises(FileNotFoundError, match="packaged teachers"):
        Teacher.from_pretrained("no_such_teacher")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FashionMNIST(root="/no/such/folder")


def test_truncated_idx_file(tmp_path):
    good = tmp_path / "x-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    with gzip.open(good, "wb") as f:
        f.write(header + bytes(100))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(good)
    (tmp_path / "y.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="could not read"):
        read_idx(tmp_path / "y.gz")


def test_cli_reports_bad_input_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffdistill.cli.train", "backbone.path=/no/teacher", f"run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "diffdistill: error:" in proc.stderr and "/no/teacher" in proc.stderr
