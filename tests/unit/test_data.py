from pathlib import Path

import numpy as np
import pytest
import torch

from diffdistill.data import FashionMNIST, ImageFolder, InfiniteBatcher, SyntheticImages
from diffdistill.data.fashion_mnist import DEBIAN_ROOT

has_fmnist = Path(DEBIAN_ROOT, "t10k-images-idx3-ubyte.gz").exists()


@pytest.mark.skipif(not has_fmnist, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    ds = FashionMNIST(split="test", resolution=32)
    assert len(ds) == 10_000 and ds.sample_shape == (1, 32, 32)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.images[:, :, :2].max() == 0  # the 2-pixel padding
    b = ds.get(torch.arange(8))
    assert b.x0.min() >= -1 and b.x0.max() <= 1 and b.cond.class_labels.shape == (8,)
    small = FashionMNIST(split="test", resolution=8, limit=16)
    assert small.sample_shape == (1, 8, 8)


def test_user_supplied_idx_files(tmp_path, monkeypatch):
    import gzip

    imgs = np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in imgs.shape) + imgs.tobytes())
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes([0, 1, 2, 3, 4]))
    ds = FashionMNIST(root=str(tmp_path), resolution=28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs))
    assert ds.labels.tolist() == [0, 1, 2, 3, 4]


def test_batcher_resumes_exactly():
    ds = SyntheticImages(num=50)
    a = InfiniteBatcher(ds, 8, seed=3)
    seq = [a.next().x0 for _ in range(9)]  # crosses an epoch boundary
    b = InfiniteBatcher(ds, 8, seed=3)
    for _ in range(4):
        b.next()
    state = b.state_dict()
    c = InfiniteBatcher(ds, 8, seed=0)
    c.load_state_dict(state)
    assert all(torch.equal(c.next().x0, s) for s in seq[4:])


def test_image_folder(tmp_path):
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = ImageFolder(str(tmp_path), resolution=16, class_subfolders=True)
    assert ds.images.shape == (6, 3, 16, 16) and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(FileNotFoundError):
        ImageFolder(str(tmp_path / "missing"), 16)
