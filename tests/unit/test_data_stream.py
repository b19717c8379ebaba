"""The data stream: in-memory and decoded-on-demand datasets give the same batches, with any number of workers,
resume exactly, split disjointly across ranks, mirror on request, and reject bad files naming them."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffdistill.data import DataStream, ImageFolder, ImageFolderStream, ImageTensorDataset, TarShards
from diffdistill.data.archives import expand_shards

N = 24  # images in the test folder: two classes, 8x8 RGB


def image_array(i: int, size: int = 8) -> np.ndarray:
    """Image ``i``: channel 0 at pixel (0, 0) holds ``3 i`` (its identity); a ramp along x makes it asymmetric."""
    x = np.arange(size, dtype=np.int64)[None, :, None] * 20
    c = np.arange(3, dtype=np.int64)[None, None, :]
    a = (3 * i + x + c + np.zeros((size, 1, 1), np.int64)) % 256
    a[0, 0, 0] = 3 * i
    return a.astype(np.uint8)


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path, n: int = N) -> Path:
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_array(i)).save(root / f"c{i % 2}" / f"{i:03d}.png")
    return root


def identities(batch) -> list[int]:
    """The image numbers ``i`` of a batch of unmirrored test images."""
    x = ((batch.x0[:, 0, 0, 0] + 1) * 127.5).round().long()
    return (x // 3).tolist()


def take(stream: DataStream, iterations: int) -> list[list]:
    return [stream.next() for _ in range(iterations)]


def same(a: list[list], b: list[list]) -> bool:
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return all(
        va == vb and torch.equal(ba.x0, bb.x0) and eq(ba.cond.class_labels, bb.cond.class_labels)
        for ia, ib in zip(a, b, strict=True)
        for (va, ba), (vb, bb) in zip(ia, ib, strict=True)
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"))


def test_streamed_folder_gives_the_in_memory_batches(folder):
    memory = ImageFolder(str(folder), resolution=8, class_subfolders=True)
    streamed = ImageFolderStream(str(folder), resolution=8, class_subfolders=True, num_workers=0)
    assert len(streamed) == len(memory) == N and streamed.num_classes == memory.num_classes == 2
    assert streamed.class_names == ("c0", "c1") and streamed.sample_shape == (3, 8, 8)
    a = take(DataStream(memory, 5, seed=3), 7)  # 7 x 5 > 24: crosses an epoch boundary
    b = take(DataStream(streamed, 5, seed=3), 7)
    assert same(a, b)
    # labels are the class subfolders, pixels the files' (PNG is lossless, no resize at 8 px)
    batch = b[0][0][1]
    ids = identities(batch)
    assert batch.cond.class_labels.tolist() == [i % 2 for i in ids]
    want = torch.stack([torch.from_numpy(image_array(i)).permute(2, 0, 1) for i in ids]).float() / 127.5 - 1
    assert torch.equal(batch.x0, want)


def test_zero_and_two_workers_give_the_same_batches(folder):
    def stream(workers):
        ds = ImageFolderStream(str(folder), resolution=8, class_subfolders=True, num_workers=workers)
        return DataStream(ds, 4, accumulation=2, seed=1)

    assert same(take(stream(0), 5), take(stream(2), 5))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_exactly(folder, workers):
    ds = ImageFolderStream(str(folder), resolution=8, class_subfolders=True, num_workers=workers, prefetch_factor=3)
    reference = take(DataStream(ds, 5, seed=7), 8)
    first = DataStream(ds, 5, seed=7)
    take(first, 3)  # the workers have prefetched beyond this: the state is what was consumed
    state = first.state_dict()
    assert state == {"epoch": 0, "offset": 15, "seed": 7, "num_samples": N, "fingerprint": ds.fingerprint}
    resumed = DataStream(ds, 5, seed=0)
    resumed.load_state_dict(state)
    assert same(take(resumed, 5), reference[3:])


def test_in_memory_resume_is_bit_exact_and_unchanged():
    """The in-memory path is the slicing the trainer always did: micro-batch v is slice v of the global batch."""
    from diffdistill.data import InfiniteBatcher, SyntheticImages

    ds = SyntheticImages(num=50)
    batcher = InfiniteBatcher(ds, 12, seed=2)
    stream = DataStream(ds, 3, accumulation=2, world_size=2, rank=1, seed=2)
    for _ in range(6):
        idx = batcher.next_indices()
        got = stream.next()
        assert [v for v, _ in got] == [2, 3]
        for v, batch in got:
            assert torch.equal(batch.x0, ds.get(idx[3 * v : 3 * v + 3]).x0)
    resumed = DataStream(ds, 3, accumulation=2, world_size=2, rank=1)
    resumed.load_state_dict(stream.state_dict())
    idx = batcher.next_indices()
    assert torch.equal(resumed.next()[0][1].x0, ds.get(idx[6:9]).x0)


def test_resume_refuses_a_dataset_that_changed(folder, tmp_path):
    ds = ImageFolderStream(str(folder), resolution=8, num_workers=0)
    state = DataStream(ds, 4).state_dict()
    smaller = ImageFolderStream(str(folder), resolution=8, num_workers=0, limit=20)
    with pytest.raises(ValueError, match="24 samples.*now has 20"):
        DataStream(smaller, 4).load_state_dict(state)
    # the same count, but one file replaced by another image: names or sizes differ, the resume is refused
    copy = make_folder(tmp_path / "copy")
    DataStream(ImageFolderStream(str(copy), resolution=8, num_workers=0), 4).load_state_dict(state)  # same files
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(copy / "c0" / "000.png")
    changed = ImageFolderStream(str(copy), resolution=8, num_workers=0)
    with pytest.raises(ValueError, match="saved over other files"):
        DataStream(changed, 4).load_state_dict(state)
    flipped = ImageFolderStream(str(folder), resolution=8, num_workers=0, limit=12, xflip=True)  # 24 samples too
    with pytest.raises(ValueError, match="saved over other files"):
        DataStream(flipped, 4).load_state_dict(state)


def test_two_ranks_read_disjoint_samples_that_cover_the_epoch(folder):
    ds = ImageFolderStream(str(folder), resolution=8, class_subfolders=True, num_workers=2)
    # global batch 2 ranks x 2 micro-batches x 3 = 12: an epoch of 24 images is 2 iterations
    seen = {}
    for rank in (0, 1):
        stream = DataStream(ds, 3, accumulation=2, world_size=2, rank=rank, seed=5)
        its = take(stream, 2)
        assert [[v for v, _ in it] for it in its] == [[2 * rank, 2 * rank + 1]] * 2
        seen[rank] = [i for it in its for _, b in it for i in identities(b)]
    assert len(seen[0]) == len(seen[1]) == 12
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(N))
    # and each rank's micro-batch is the single-process stream's slice of the same global batch
    single = take(DataStream(ds, 3, accumulation=4, seed=5), 2)
    flat = [i for it in single for _, b in it for i in identities(b)]
    assert flat[:6] + flat[12:18] == seen[0] and flat[6:12] + flat[18:] == seen[1]


def test_xflip_doubles_the_dataset_with_mirror_images(folder):
    plain = ImageFolderStream(str(folder), resolution=8, num_workers=0)
    flipped = ImageFolderStream(str(folder), resolution=8, num_workers=0, xflip=True)
    assert len(flipped) == 2 * N
    for i in (0, 5, N - 1):
        assert torch.equal(flipped[i][0], plain[i][0])
        assert torch.equal(flipped[N + i][0], plain[i][0].flip(-1))
        assert not torch.equal(flipped[N + i][0], plain[i][0])  # the test images are not symmetric
    memory = ImageFolder(str(folder), resolution=8, xflip=True)
    idx = torch.tensor([0, N + 3, 7, 2 * N - 1])
    want = torch.stack([flipped[int(i)][0] for i in idx]).float() / 127.5 - 1
    assert len(memory) == 2 * N and torch.equal(memory.get(idx).x0, want)
    assert torch.equal(memory.images[3], plain[3][0])  # the stored images are not mirrored in place
    # over one epoch a stream sees every image once as it is and once mirrored
    batches = take(DataStream(flipped, 8, seed=0), 6)
    x = torch.cat([b.x0 for it in batches for _, b in it])
    mirrored = (x[:, 0, 0, 0] != x[:, 0, 0, 7]) & (x[:, 0, 0, 7] < x[:, 0, 0, 0])
    assert x.shape[0] == 2 * N and int(mirrored.sum()) == N


def test_xflip_config_composes_and_instantiates(folder):
    from hydra.utils import instantiate

    from tests.helpers import TINY, compose_train

    for option in ("image_folder", "image_folder_stream"):
        cfg = compose_train([*TINY, f"data={option}", f"data.root={folder}", "data.resolution=8", "data.xflip=true"])
        ds = instantiate(cfg.data)
        assert ds.xflip and len(ds) == 2 * N
    with pytest.raises(ValueError, match="data.xflip must be true or false"):
        ImageFolderStream(str(folder), resolution=8, xflip="yes")


def test_a_corrupt_image_is_one_error_naming_the_file(tmp_path):
    root = make_folder(tmp_path / "bad", n=6)
    (root / "c0" / "004.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ValueError, match=r"cannot decode image '.*c0/004\.png'"):
        ImageFolder(str(root), resolution=8)
    ds = ImageFolderStream(str(root), resolution=8, num_workers=2)
    with pytest.raises(ValueError, match=r"cannot decode image '.*c0/004\.png'"):
        take(DataStream(ds, 6), 1)  # decoded in a worker, re-raised here


def test_a_mixed_size_folder_is_one_error_naming_the_file(tmp_path):
    root = make_folder(tmp_path / "mixed", n=4)
    Image.fromarray(np.zeros((10, 8, 3), np.uint8)).save(root / "c1" / "odd.png")
    with pytest.raises(ValueError, match=r"image '.*c1/odd\.png' is 8x10, not 8x8.*data\.resize"):
        ImageFolder(str(root), resolution=8, resize="none")
    ds = ImageFolderStream(str(root), resolution=8, resize="none", num_workers=0)
    with pytest.raises(ValueError, match=r"c1/odd\.png' is 8x10"):
        take(DataStream(ds, 5), 1)
    assert ImageFolderStream(str(root), resolution=8, num_workers=0)[4][0].shape == (3, 8, 8)  # center_crop copes


def test_bad_options_name_their_key(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="data.root"):
        ImageFolderStream(str(tmp_path / "missing"), resolution=8)
    for kwargs, key in (
        ({"num_workers": -1}, "data.num_workers"),
        ({"prefetch_factor": 0}, "data.prefetch_factor"),
        ({"pin_memory": "sometimes"}, "data.pin_memory"),
        ({"resize": "stretch"}, "data.resize"),
        ({"channels": 2}, "data.channels"),
        ({"limit": 0}, "data.limit"),
    ):
        with pytest.raises(ValueError, match=key):
            ImageFolderStream(str(folder), resolution=8, **kwargs)


# ---------------------------------------------------------------------------------------------- tar shards


def write_shards(folder: Path, out: Path, per_shard: int = 10) -> list[Path]:
    """The folder's images (in its sorted order) as WebDataset shards: ``<key>.png`` + ``<key>.cls``."""
    files = sorted(folder.rglob("*.png"))
    shards = []
    for s in range(0, len(files), per_shard):
        path = out / f"train-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for f in files[s : s + per_shard]:
                key = f"{f.parent.name}/{f.stem}"
                for ext, data in (("png", f.read_bytes()), ("cls", f.parent.name[1:].encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def test_tar_shards_give_the_folders_batches(folder, tmp_path):
    shards = write_shards(folder, tmp_path)
    assert len(shards) == 3
    assert expand_shards(str(tmp_path / "train-{000000..000002}.tar")) == shards
    assert expand_shards(str(tmp_path / "*.tar")) == shards
    tar = TarShards(str(tmp_path / "train-{000000..000002}.tar"), resolution=8, num_workers=2)
    assert len(tar) == N and tar.num_classes == 2 and tar.keys[0] == "c0/000"
    memory = ImageFolder(str(folder), resolution=8, class_subfolders=True)
    assert same(take(DataStream(tar, 6, seed=4), 5), take(DataStream(memory, 6, seed=4), 5))


def test_bad_shards_are_one_clear_error(folder, tmp_path):
    write_shards(folder, tmp_path)
    with pytest.raises(FileNotFoundError, match="data.shards"):
        TarShards(str(tmp_path / "train-{000000..000005}.tar"), resolution=8)
    with pytest.raises(ValueError, match=r"sample 'c0/000' has no \.json member \(data.label_key\)"):
        TarShards(str(tmp_path / "*.tar"), resolution=8, label_key="json")
    gz = tmp_path / "gz" / "train.tar.gz"
    gz.parent.mkdir()
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(sorted(folder.rglob("*.png"))[0], arcname="a.png")
    with pytest.raises(ValueError, match="not an uncompressed tar.*data.shards"):
        TarShards(str(gz), resolution=8, label_key=None)
    corrupt = tmp_path / "corrupt" / "train.tar"
    corrupt.parent.mkdir()
    with tarfile.open(corrupt, "w") as tf:
        info = tarfile.TarInfo("k1.png")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"nopng"))
    ds = TarShards(str(corrupt), resolution=8, label_key=None, num_workers=0)
    assert ds.num_classes is None
    with pytest.raises(ValueError, match=r"cannot decode image '.*train\.tar:k1'"):
        ds[0]


# ---------------------------------------------------------------------------------- Hugging Face datasets


def test_hf_dataset_from_disk_gives_the_folders_batches(folder, tmp_path):
    datasets = pytest.importorskip("datasets")
    from diffdistill.data import HFImages

    files = sorted(folder.rglob("*.png"))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["c0", "c1"])})
    rows = {
        "image": [{"bytes": f.read_bytes(), "path": None} for f in files],
        "label": [int(f.parent.name[1]) for f in files],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    hf = HFImages(str(tmp_path / "hf"), resolution=8, num_workers=2)
    assert len(hf) == N and hf.num_classes == 2 and hf.class_names == ("c0", "c1")
    memory = ImageFolder(str(folder), resolution=8, class_subfolders=True)
    assert same(take(DataStream(hf, 6, seed=9), 5), take(DataStream(memory, 6, seed=9), 5))
    unconditional = HFImages(str(tmp_path / "hf"), resolution=8, label_column=None, num_workers=0)
    assert take(DataStream(unconditional, 4), 1)[0][0][1].cond.class_labels is None
    with pytest.raises(ValueError, match=r"data.image_column 'img' is not a column .*\['image', 'label'\]"):
        HFImages(str(tmp_path / "hf"), resolution=8, image_column="img")
    with pytest.raises(FileNotFoundError, match="data.path"):  # a local-looking path is never a hub request
        HFImages(str(tmp_path / "nowhere"), resolution=8)
    with pytest.raises(ValueError, match=r"could not load the Hugging Face dataset 'user/no-such-set' \(data.path\)"):
        HFImages("user/no-such-set", resolution=8)  # a hub id: the network is blocked in tests


# ------------------------------------------------------------------------------------------ in the trainer


def _tiny_run(run_dir: Path, root: Path, *extra: str):
    from tests.helpers import TINY, compose_train

    return compose_train(
        [
            *TINY,
            "data=image_folder_stream",
            f"data.root={root}",
            "data.resolution=8",
            "data.channels=1",
            "data.class_subfolders=true",
            "logger=none",
            "trainer.sample_every=0",
            f"run_dir={run_dir}",
            *extra,
        ]
    )


def test_training_on_a_streamed_folder_runs_and_resumes_bit_exactly(folder, tmp_path):
    """Through diffdistill-train's ``run``: 4 steps straight (2 workers) equal 2 steps (no workers) + a resume to 4."""
    from diffdistill.cli.train import run
    from diffdistill.training.builders import build_trainer
    from diffdistill.training.checkpoint import load_checkpoint

    run(_tiny_run(tmp_path / "straight", folder, "trainer.max_steps=4", "data.num_workers=2"))
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step0000004")
    build_trainer(_tiny_run(tmp_path / "split", folder, "trainer.max_steps=2", "data.num_workers=0")).fit()
    resumed = build_trainer(
        _tiny_run(tmp_path / "split", folder, "trainer.max_steps=4", "trainer.resume=auto", "data.num_workers=2")
    )
    assert resumed.data.streamed
    resumed.fit()
    assert resumed.step == straight["step"] == 4
    assert straight["data"] == resumed.data.state_dict()
    assert {k: straight["data"][k] for k in ("epoch", "offset", "seed", "num_samples")} == {
        "epoch": 1,
        "offset": 8,
        "seed": 0,
        "num_samples": N,
    }
    a, b = straight["roles"]["generator"], resumed.roles["generator"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_tensor_dataset_xflip_is_a_mirror():
    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).reshape(2, 1, 2, 3)
    ds = ImageTensorDataset(images, xflip=True)
    x = ds.get(torch.tensor([0, 2, 3]))
    assert len(ds) == 4
    assert torch.equal(x.x0[1], images[0].flip(-1).float() / 127.5 - 1)
    assert torch.equal(x.x0[2], images[1].flip(-1).float() / 127.5 - 1)


RANK_WORKER = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from diffdistill.training.builders import build_trainer
from tests.helpers import TINY, compose_train

root, out = sys.argv[2], Path(sys.argv[3])
cfg = compose_train([
    *TINY, "data=image_folder_stream", f"data.root={root}", "data.resolution=8", "data.channels=1",
    "data.class_subfolders=true", "data.num_workers=1", "trainer.batch_size=3", "trainer.max_steps=4",
    "trainer.sample_every=0", "trainer.checkpoint_every=0", "logger=none", f"run_dir={out / 'run'}",
])
trainer = build_trainer(cfg)
seen, read = [], trainer.data.next

def recording_next():
    micro = read()
    for _, batch in micro:
        seen.extend(((batch.x0[:, 0, 0, 0] + 1) * 127.5).round().long().div(10, rounding_mode="floor").tolist())
    return micro

trainer.data.next = recording_next
trainer.fit()
(out / f"rank{trainer.rank}.json").write_text(json.dumps({"world_size": trainer.world_size, "seen": seen}))
"""


@pytest.mark.slow
def test_two_processes_under_accelerate_read_disjoint_samples_covering_the_epoch(tmp_path):
    """torchrun, 2 processes (gloo): the trainer's streams split each global batch of 6 between the ranks; 4
    iterations are one epoch of the 24 images, each read by exactly one process."""
    import os
    import socket
    import subprocess
    import sys

    root = tmp_path / "gray"
    root.mkdir()
    for i in range(N):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(root / f"c{i % 2}" / f"{i:03d}.png")
    (tmp_path / "worker.py").write_text(RANK_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[2])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(tmp_path / "worker.py"),
        repo,
        str(root),
        str(tmp_path),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    import json

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    a, b = ranks[0]["seen"], ranks[1]["seen"]
    assert len(a) == len(b) == 12 and set(a).isdisjoint(b) and sorted(a + b) == list(range(N))
