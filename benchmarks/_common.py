"""Shared pieces of the benchmarks: machine record, timing, peak memory, and the benchmark networks.

Networks (random weights, built from config; nothing is downloaded):

* ``fashion_mnist``: the packaged Fashion-MNIST teacher architecture (``configs/backbone/fashion_mnist_unet.yaml``),
  class-conditional 32x32x1, 1.06M parameters.
* ``sd_tiny``: the tiny SD-shaped ``UNet2DConditionModel`` (985k parameters, 16x16x4 latents, cross-attention
  dim 32) on which the diffusers LCM script (``examples/consistency_distillation/train_lcm_distill_sd_wds.py``)
  was timed (``benchmarks/README.md``, Networks). Prompts are stood in for by
  per-class prompt embeddings (a frozen lookup table; the last row is the empty prompt, so classifier-free
  guidance runs through the teacher's batched ``[cond; uncond]`` path). ``bench_t2i_step.py`` times the same UNet on the
  real path instead: ``backbone=sd`` (``DiffusersSDDenoiser``) with its text encoder and VAE in both steps.
* ``adm_dmd2``: the EDM-preconditioned ADM U-Net of DMD2's ImageNet-64 code (``tianweiy/DMD2``, ``main/edm/``):
  64x64x3, 1000 classes, 32 base channels, multipliers [1, 2, 3, 4], one block per level, attention at 32/16/8,
  built as a diffusers ``UNet2DModel`` with residual up/down-sampling and scale-shift norm (4.63M parameters vs 4.65M).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# machine record


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def concurrent_runs() -> list[str]:
    """Command lines of diffdistill training / evaluation processes running beside the benchmark."""
    try:
        out = subprocess.run(["pgrep", "-af", "diffdistill-(teacher|train|eval)"], capture_output=True, text=True)
    except OSError:
        return []
    return [line.split(" ", 1)[1] for line in out.stdout.splitlines() if " " in line]


def machine_info(device: str) -> dict[str, Any]:
    """Date, host, versions, threads and load: what a committed result needs to be comparable."""
    import diffdistill

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "precision": "fp32",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffdistill": getattr(diffdistill, "__version__", "0.1.0"),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
        "concurrent_runs_at_start": concurrent_runs(),
    }
    for mod in ("diffusers", "accelerate", "numpy"):
        with contextlib.suppress(Exception):
            info[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    return info


def write_result(path: str | Path, result: dict[str, Any]) -> Path:
    """Write a benchmark's result JSON (creating the folder); called after each part so partial results survive."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def finish_info(info: dict[str, Any]) -> dict[str, Any]:
    info["load_average_at_end"] = list(os.getloadavg())
    info["concurrent_runs_at_end"] = concurrent_runs()
    running = bool(info["concurrent_runs_at_start"] or info["concurrent_runs_at_end"])
    load = max(info["load_average_at_start"][0], info["load_average_at_end"][0])
    info["measured_under_contention"] = bool(running or load > 1.5 * (os.cpu_count() or 1))
    return info


# ---------------------------------------------------------------------------------------------
# timing and memory


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(
    fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device | str = "cpu", group: int = 1
) -> dict[str, float]:
    """Call ``fn`` ``warmup`` times, then ``repeats`` groups of ``group`` calls; per-call times of each group.

    Returns ``median_ms`` (median over groups of the mean call time in the group: a group is one full update
    cycle for objectives whose schedule repeats every ``group`` iterations), ``min_ms``, ``max_ms`` and
    ``first_call_ms`` (the first warm-up call: includes one-off costs such as ``torch.compile``).
    """
    first_ms = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i == 0:
            first_ms = (time.perf_counter() - t0) * 1000.0
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(group):
            fn()
        sync(device)
        per.append((time.perf_counter() - t0) * 1000.0 / group)
    return {
        "median_ms": statistics.median(per),
        "min_ms": min(per),
        "max_ms": max(per),
        "repeats": repeats,
        "group": group,
        "first_call_ms": first_ms,
    }


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


class PeakMemory:
    """Peak memory of a block, in MiB above the memory in use when it starts.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact, allocator level). CPU: the process's peak resident set
    (``VmHWM``, reset through ``/proc/self/clear_refs``) after ``malloc_trim``, i.e. what the block makes the
    OS hand out: activations, gradients, optimiser temporaries and allocator slack. ``None`` where the
    kernel refuses the reset.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_mib: float | None = None
        self.base_mib: float | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_mib = torch.cuda.memory_allocated() / 2**20
            return self
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base_mib = _status_kb("VmRSS") / 1024
        except OSError:
            self.base_mib = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20 - self.base_mib
        elif self.base_mib is not None:
            self.peak_mib = _status_kb("VmHWM") / 1024 - self.base_mib


def tensor_bytes(*objs: Any) -> int:
    """Bytes of the distinct tensors reachable from modules, optimisers and tensors (storage counted once)."""
    seen: set[int] = set()
    total = 0

    def add(t: Tensor) -> None:
        nonlocal total
        if not torch.is_tensor(t):
            return
        key = t.untyped_storage().data_ptr()
        if key in seen or key == 0:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    def visit(o: Any) -> None:
        if isinstance(o, nn.Module):
            for t in (*o.parameters(), *o.buffers()):
                add(t)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values():
                    add(v)
        elif torch.is_tensor(o):
            add(o)
        elif isinstance(o, (list, tuple)):
            for x in o:
                visit(x)
        elif isinstance(o, dict):
            for x in o.values():
                visit(x)

    for o in objs:
        visit(o)
    return total


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# networks


class SDCondBackbone(nn.Module):
    """A diffusers ``UNet2DConditionModel`` behind diffdistill's backbone interface ``F(x_in, c_noise, cond)``.

    ``cond.prompt_embeds`` is used when given; otherwise class labels index a frozen table of prompt embeddings
    (a text-encoder stand-in whose last row, the null class, plays the empty prompt for classifier-free guidance).
    """

    def __init__(
        self, unet_config: dict[str, Any], num_classes: int = 10, seq_len: int = 8, c_noise_scale: float = 1000.0
    ):
        super().__init__()
        from diffusers import UNet2DConditionModel

        from diffdistill.models.backbones import GuidanceEmbedding

        self._guidance_cls = GuidanceEmbedding
        self.unet = UNet2DConditionModel(**unet_config)
        self.num_classes, self.c_noise_scale = num_classes, float(c_noise_scale)
        dim = self.unet.config.cross_attention_dim
        self.register_buffer("prompt_table", torch.randn(num_classes + 1, seq_len, dim))
        self.guidance_emb: nn.Module | None = None
        self._pending: Tensor | None = None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        s = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (c.in_channels, s, s)

    def enable_guidance_embedding(self) -> None:
        """LCM's guidance-conditioned student: zero-initialised ``w`` embedding added to the time embedding."""
        if self.guidance_emb is None:
            out = self.unet.time_embedding.linear_2.out_features
            self.guidance_emb = self._guidance_cls(out).to(next(self.unet.parameters()).device)
            self.unet.time_embedding.register_forward_hook(self._add_guidance)

    def _add_guidance(self, module, inputs, output):
        return output if self._pending is None else output + self._pending.to(output.dtype)

    def forward(self, x_in: Tensor, c_noise: Tensor, cond) -> Tensor:
        from diffdistill.models.backbones import _guidance

        emb = cond.prompt_embeds
        if emb is None:
            labels = cond.class_labels
            if labels is None:
                labels = torch.full((x_in.shape[0],), self.num_classes, device=x_in.device)
            emb = self.prompt_table[labels.long()]
        if self.guidance_emb is not None:
            self._pending = self.guidance_emb(_guidance(cond, x_in.shape[0], x_in.device))
        try:
            return self.unet(x_in, self.c_noise_scale * c_noise, encoder_hidden_states=emb).sample
        finally:
            self._pending = None


SD_TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

ADM_UNET = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 96, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=32,
    norm_num_groups=32,
    resnet_time_scale_shift="scale_shift",
    downsample_type="resnet",
    upsample_type="resnet",
)


@dataclass
class Network:
    """A benchmark network: its teacher (random weights), a random dataset of its shape, and the peer note."""

    name: str
    teacher: Any
    dataset: Any
    batch_size: int
    description: str
    peer: dict[str, Any] | None = None


def fashion_mnist_denoiser(seed: int = 0):
    """The packaged teacher's architecture (``configs/backbone/fashion_mnist_unet.yaml``), random weights."""
    from omegaconf import OmegaConf

    from diffdistill.models.builders import edm_unet

    path = ROOT / "diffdistill" / "configs" / "backbone" / "fashion_mnist_unet.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path).denoiser, resolve=True)
    cfg.pop("_target_")
    torch.manual_seed(seed)
    return edm_unet(**cfg)


def random_images(shape: tuple[int, ...], num_classes: int | None, n: int = 256, seed: int = 0):
    from diffdistill.data.images import ImageTensorDataset

    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g) if num_classes else None
    return ImageTensorDataset(imgs, labels, num_classes, name=f"random-{'x'.join(map(str, shape))}")


def build_network(name: str, guidance_scale: float = 1.0, seed: int = 0) -> Network:
    from diffdistill.models.backbones import UNetBackbone
    from diffdistill.models.denoiser import EDMDenoiser
    from diffdistill.models.teacher import Teacher

    torch.manual_seed(seed)
    if name == "fashion_mnist":
        den = fashion_mnist_denoiser(seed)
        return Network(
            name,
            Teacher(den, guidance_scale),
            random_images((1, 32, 32), 10),
            32,
            f"configs/teacher.yaml UNet2DModel, 32x32x1, 10 classes, {count_params(den):,} params",
        )
    if name == "sd_tiny":
        den = EDMDenoiser(SDCondBackbone(SD_TINY_UNET, num_classes=10), sigma_data=0.5)
        return Network(
            name,
            Teacher(den, guidance_scale),
            random_images((4, 16, 16), 10),
            16,
            f"tiny SD-shaped UNet2DConditionModel, 16x16x4 latents, cross-attn 32, "
            f"{count_params(den.net.unet):,} params",
            {
                "code": "diffusers train_lcm_distill_sd_wds.py (58eb52c)",
                "objective": "lcm",
                "ratio": 1.94,
                "note": "0.344 s vs 0.177 s; includes text encoder (7 ms) and VAE (9 ms) "
                "in both steps, which diffdistill's latent benchmark has no counterpart for",
            },
        )
    if name == "adm_dmd2":
        den = EDMDenoiser(UNetBackbone(ADM_UNET, num_classes=1000), sigma_data=0.5)
        return Network(
            name,
            Teacher(den, guidance_scale),
            random_images((3, 64, 64), 1000),
            16,
            f"ADM-shaped UNet2DModel (DMD2 ImageNet-64 EDM net), 64x64x3, 1000 classes, "
            f"{count_params(den.net.unet):,} params",
            {
                "code": "tianweiy/DMD2 EDM loss code",
                "objective": "dmd (critic 5 : generator 1)",
                "ratio": [2.23, 2.29],
                "generator_turn": [1.86, 1.96],
                "critic_turn": [1.61, 1.67],
                "note": "with the diffusion-GAN term (classifier head on the fake UNet encoder): compare the dmd2 row "
                "(dmd_ttur5 is the same schedule without the GAN term)",
            },
        )
    raise ValueError(f"unknown network '{name}' (fashion_mnist, sd_tiny, adm_dmd2)")


NETWORKS = ("fashion_mnist", "sd_tiny", "adm_dmd2")
