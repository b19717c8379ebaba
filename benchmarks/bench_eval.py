"""Evaluation speed: images/s of feature extraction per extractor and of generation, on this machine.

    python benchmarks/bench_eval.py [--threads 1] [--out benchmarks/results/eval_speed.json]

Inputs are 32x32 grayscale uint8 images (Fashion-MNIST's format), so extraction times include the
clean-fid resize to each network's input size. Extractors whose weights are user-supplied (Inception, CLIP)
are timed with random weights of the same architecture (speed only). Generation uses the packaged
Fashion-MNIST teacher architecture (configs/backbone/fashion_mnist_unet.yaml) with random weights.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
import warnings
from pathlib import Path

import torch
from _common import cpu_model, write_result  # benchmarks/ is on sys.path when a script runs
from torch import nn


def _rate(fn, n: int, repeats: int = 2) -> float:
    """Best images/s over ``repeats`` runs of ``fn()`` processing ``n`` images (after one warm-up call)."""
    fn()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def _random_legacy_inception():
    """clean-fid's pytorch-fid Inception port with random weights (same compute as the real one)."""
    import cleanfid.inception_pytorch as ip

    from diffdistill.evaluation.extractors import Inception

    orig_load, orig_url = nn.Module.load_state_dict, ip.load_state_dict_from_url
    nn.Module.load_state_dict = lambda self, sd, strict=True, assign=False: None
    ip.load_state_dict_from_url = lambda *a, **k: {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = ip.InceptionV3(output_blocks=[3], resize_input=False).eval()
    finally:
        nn.Module.load_state_dict, ip.load_state_dict_from_url = orig_load, orig_url
    ex = Inception.__new__(Inception)
    nn.Module.__init__(ex)
    ex.net, ex.mode, ex.id = net, "legacy_pytorch", "inception_legacy_pytorch"
    ex.input_size, ex.feature_dim = (299, 299), 2048
    ex.weights_path = ex.weights_sha256 = None
    ex.weights_source = "random (speed only)"
    return ex


def bench_extractors(quick: bool) -> list[dict]:
    from diffdistill.evaluation.extractors import CLIP, build_extractor

    cases = [
        ("random_cnn", lambda: build_extractor("random_cnn"), 512, "random (test extractor)"),
        ("effnet_lite0", lambda: build_extractor("effnet_lite0"), 48, "pretrained (wheel)"),
        ("effnet_lite0_128", lambda: build_extractor("effnet_lite0", input_size=128), 128, "pretrained (wheel)"),
        ("effnet_lite0_96", lambda: build_extractor("effnet_lite0", input_size=96), 192, "pretrained (wheel)"),
        ("inception_legacy_pytorch", _random_legacy_inception, 24, "random, same architecture (speed only)"),
        (
            "clip_ViT-B-32-quickgelu",
            lambda: CLIP("ViT-B-32-quickgelu", pretrained=False),
            32,
            "random, same architecture (speed only)",
        ),
    ]
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, build, n, weights in cases:
        if quick:
            n = max(8, n // 4)
        ex = build()
        imgs = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=g)
        bs = min(64, n)
        total = _rate(lambda ex=ex, imgs=imgs, bs=bs: ex.extract(imgs, batch_size=bs), n)
        prep = _rate(lambda ex=ex, imgs=imgs: ex.preprocess(imgs), n)
        rows.append(
            {
                "extractor": name,
                "weights": weights,
                "input_size": list(ex.input_size),
                "feature_dim": ex.feature_dim,
                "num_images": n,
                "batch_size": bs,
                "images_per_s": round(total, 2),
                "resize_only_images_per_s": round(prep, 1),
            }
        )
        print(rows[-1])
    return rows


def bench_generation(quick: bool) -> list[dict]:
    from omegaconf import OmegaConf

    from diffdistill.cli.common import CONFIG_DIR
    from diffdistill.evaluation.generation import generate
    from diffdistill.models import Generator, Teacher
    from diffdistill.models.builders import edm_unet

    arch = Path(CONFIG_DIR) / "backbone" / "fashion_mnist_unet.yaml"
    model_cfg = OmegaConf.to_container(OmegaConf.load(arch).denoiser, resolve=True)
    model_cfg.pop("_target_")
    torch.manual_seed(0)
    den = edm_unet(**model_cfg)
    n_params = sum(p.numel() for p in den.parameters())
    teacher = Teacher(den)
    cases = [
        ("generator one-step", Generator.from_teacher(teacher, 80.0), {}, 128),
        ("generator 4-step", Generator.from_teacher(teacher, 80.0, [80.0, 2.0, 0.5, 0.1]), {}, 64),
        ("teacher Heun 18 steps (35 NFE)", teacher, {"steps": 18}, 8),
    ]
    rows = []
    for name, model, kw, n in cases:
        if quick:
            n = max(4, n // 4)
        rate = _rate(lambda model=model, kw=kw, n=n: generate(model, n, seed=0, batch_size=min(64, n), **kw), n)
        rows.append(
            {
                "model": name,
                "architecture": "configs/teacher.yaml UNet (random weights)",
                "parameters": n_params,
                "resolution": 32,
                "num_images": n,
                "images_per_s": round(rate, 2),
            }
        )
        print(rows[-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_speed.json"))
    ap.add_argument("--quick", action="store_true", help="fewer images (smoke run)")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. concurrent load)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import diffdistill

    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffdistill": getattr(diffdistill, "__version__", "0.1.0"),
        "platform": platform.platform(),
    }
    for mod in ("timm", "open_clip", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    result = {
        "benchmark": "eval_speed",
        "machine": info,
        "note": args.note,
        "input": "uint8 32x32 grayscale (repeated to RGB, clean-fid resize to the extractor input)",
        "feature_extraction": bench_extractors(args.quick),
        "generation": bench_generation(args.quick),
    }
    result["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
