"""Images per second of the data stream (``diffdistill/data/loader.py``) at 32 and 64 px, and whether it keeps up
with a training step.

    OMP_NUM_THREADS=1 python benchmarks/bench_loader.py [--images 2048] [--batch 64] [--workers 0 1 2]

Setup: ``--images`` PNG files per resolution, written once to a temporary folder (smooth random colour fields plus
noise, so PNG compresses them about as much as photographs: ~2.4 KB at 32 px, ~9 KB at 64 px), served as an image
folder decoded into memory (``data=image_folder``: the one-off decode time, then slicing), an image folder decoded on
demand (``data=image_folder_stream``), WebDataset tar shards (``data=webdataset``, 256 images a shard) and a
``datasets`` folder (``data=hf_datasets``, when the package is installed). Each is read through ``DataStream`` with
micro-batches of ``--batch``, after ``--warmup`` batches (worker start-up), for ``--seconds``; images/s is images
delivered over wall time.

Keeping up: a plain denoising step (forward + backward + AdamW) of the ADM-shaped U-Net of ``_common.ADM_UNET``
(DMD2's ImageNet-64 network; fully convolutional, so also run at 32 px) on batches of ``--step-batch`` read from
the streamed folder with 2 workers, in the same process as the training: ``wait_ms`` is the time the step waited
for its batch, ``step_ms`` the whole iteration. On this 2-core CPU the workers compete with the step for the cores;
on a GPU the step is far shorter and the decoding rate is what has to be compared with it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import ADM_UNET, RESULTS, finish_info, machine_info, write_result
from PIL import Image

from diffdistill.data import DataStream, ImageFolder, ImageFolderStream, TarShards


def write_images(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` PNGs ``size x size`` in 10 class folders: upsampled 4x4 colour fields plus mild noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
        a = np.clip(field + rng.integers(-6, 7, field.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / f"{i:06d}.png")
    return root


def write_shards(root: Path, out: Path, per_shard: int = 256) -> str:
    import io
    import tarfile

    files = sorted(root.rglob("*.png"))
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(files), per_shard):
        with tarfile.open(out / f"train-{s // per_shard:06d}.tar", "w") as tf:
            for f in files[s : s + per_shard]:
                for ext, data in (("png", f.read_bytes()), ("cls", f.parent.name[5:].encode())):
                    info = tarfile.TarInfo(f"{f.stem}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(out / "*.tar")


def write_hf(root: Path, out: Path) -> str | None:
    try:
        import datasets
    except ImportError:
        return None
    datasets.disable_progress_bars()
    files = sorted(root.rglob("*.png"))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": f.read_bytes(), "path": None} for f in files], "label": [0] * len(files)}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(out))
    return str(out)


def throughput(dataset, batch: int, warmup: int, seconds: float) -> dict[str, Any]:
    stream = DataStream(dataset, batch, seed=0)
    t0 = time.perf_counter()
    for _ in range(warmup):
        stream.next()
    startup = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        stream.next()
        n += batch
    wall = time.perf_counter() - t0
    stream.close()
    return {"images_per_s": round(n / wall, 1), "images": n, "warmup_s": round(startup, 3)}


def keep_up(root: Path, size: int, batch: int, steps: int, workers: int) -> dict[str, Any]:
    """Denoising steps of the ADM U-Net fed by the streamed folder: time waiting for data vs the whole step."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(**{**ADM_UNET, "sample_size": size})
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
    ds = ImageFolderStream(str(root), resolution=size, num_workers=workers)
    stream = DataStream(ds, batch, seed=0)
    stream.next()  # workers started
    waits, totals = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        ((_, b),) = stream.next()
        t1 = time.perf_counter()
        sigma = torch.rand(batch)
        x = b.x0 + sigma[:, None, None, None] * torch.randn_like(b.x0)
        loss = (net(x, sigma).sample - b.x0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        waits.append(1000 * (t1 - t0))
        totals.append(1000 * (t2 - t0))
    stream.close()
    step_ms, wait_ms = float(np.median(totals)), float(np.median(waits))
    return {
        "network": f"ADM_UNET at {size} px, {sum(p.numel() for p in net.parameters()):,} params, batch {batch}",
        "workers": workers,
        "steps": steps,
        "step_ms_median": round(step_ms, 1),
        "wait_ms_median": round(wait_ms, 2),
        "wait_ms_max": round(max(waits), 2),
        "images_per_s_needed": round(1000 * batch / step_ms, 1),
        "keeps_up": wait_ms < 0.05 * step_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--step-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=str(RESULTS / "loader_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "benchmark": "loader",
        "machine": machine_info("cpu"),
        "note": args.note,
        "setup": {
            "images": args.images,
            "format": "PNG, 10 class folders; tar shards of 256; datasets save_to_disk with the PNG bytes",
            "micro_batch": args.batch,
            "warmup_batches": args.warmup,
            "timed_seconds": args.seconds,
            "torch_threads": args.threads,
        },
        "throughput": [],
        "keep_up": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.resolutions:
            root = write_images(Path(tmp) / f"png{size}", args.images, size)
            shards = write_shards(root, Path(tmp) / f"tar{size}")
            hf = write_hf(root, Path(tmp) / f"hf{size}")
            mean_kb = np.mean([p.stat().st_size for p in root.rglob("*.png")]) / 1024
            t0 = time.perf_counter()
            memory = ImageFolder(str(root), resolution=size, class_subfolders=True)
            decode_s = time.perf_counter() - t0
            row = {"resolution": size, "mean_file_kb": round(float(mean_kb), 2)}
            row["in_memory"] = {
                "decode_all_s": round(decode_s, 2),
                "decode_images_per_s": round(args.images / decode_s, 1),
                "uint8_mib": round(memory.images.numel() / 2**20, 2),
                **throughput(memory, args.batch, args.warmup, args.seconds),
            }
            print(size, "in_memory", row["in_memory"], flush=True)
            for kind in ("image_folder_stream", "webdataset", "hf_datasets"):
                if kind == "hf_datasets" and hf is None:
                    continue
                row[kind] = {}
                for w in args.workers:
                    if kind == "image_folder_stream":
                        ds = ImageFolderStream(str(root), size, class_subfolders=True, num_workers=w)
                    elif kind == "webdataset":
                        ds = TarShards(shards, size, num_workers=w)
                    else:
                        from diffdistill.data import HFImages

                        ds = HFImages(hf, resolution=size, num_workers=w)
                    row[kind][f"workers_{w}"] = throughput(ds, args.batch, args.warmup, args.seconds)
                    print(size, kind, w, row[kind][f"workers_{w}"], flush=True)
            result["throughput"].append(row)
            write_result(args.out, result)
            if args.steps > 0:
                for w in (0, 2):
                    r = keep_up(root, size, args.step_batch, args.steps, w)
                    print(size, "keep_up", r, flush=True)
                    result["keep_up"].append({"resolution": size, **r})
                    write_result(args.out, result)
    result["machine"] = finish_info(result["machine"])
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
