"""Bad input gets one clear error and never overwrites what is on disk."""

import gzip
import subprocess
import sys

import pytest
import torch

from diffdistill.cli.train import run
from diffdistill.data.fashion_mnist import FashionMNIST, read_idx
from diffdistill.models import Teacher
from diffdistill.training.checkpoint import load_checkpoint
from tests.helpers import TINY, compose_train


def test_existing_run_folder_is_not_overwritten(tmp_path):
    run(compose_train([*TINY, f"run_dir={tmp_path}"]))
    manifest = tmp_path / "checkpoints" / "step0000004" / "manifest.json"
    before = manifest.read_bytes()
    with pytest.raises(FileExistsError, match="resume=auto"):
        run(compose_train([*TINY, f"run_dir={tmp_path}"]))
    assert manifest.read_bytes() == before


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_corrupt_foreign_and_missing_checkpoints(tmp_path):
    run(compose_train([*TINY, f"run_dir={tmp_path / 'run'}"]))
    ckpt = tmp_path / "run" / "checkpoints" / "step0000004"
    assert load_checkpoint(ckpt)["step"] == 4
    # a single-file checkpoint of another format
    (tmp_path / "old.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="another format"):
        load_checkpoint(tmp_path / "old.pt")
    # one flipped bit inside a tensor is caught by the manifest
    weights = ckpt / "generator" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        load_checkpoint(ckpt)
    # a crafted pickle never runs, even with a manifest that matches it
    import json

    from diffdistill.training.checkpoint import _sha256

    marker = tmp_path / "pwned"
    torch.save({"step": 1, "x": _Payload(marker)}, ckpt / "trainer_state.pt")
    weights.write_bytes(bytes(data[:-10]) + bytes([data[-10] ^ 0x01]) + bytes(data[-9:]))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for rel in manifest:
        f = ckpt / rel
        manifest[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_checkpoint(ckpt)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(compose_train([*TINY, f"run_dir={tmp_path / 'r'}", f"trainer.resume={tmp_path / 'missing'}"]))


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


def test_a_lora_run_refuses_a_checkpoint_without_lora(tmp_path):
    """Resuming a LoRA student from a full-student checkpoint (or any other network) is one clear line."""
    run(compose_train([*TINY, f"run_dir={tmp_path}", "objective=ect"]))
    cfg = compose_train([*TINY, f"run_dir={tmp_path}", "objective=ect", "trainer.max_steps=6", "trainer.resume=auto"])
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.student.lora = {"rank": 2}
    with pytest.raises(ValueError, match="does not match this run's network"):
        run(cfg)
