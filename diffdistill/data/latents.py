"""Precomputed VAE latents: encode an image dataset once, then train latent text-to-image runs from the file.

One safetensors file holds ``latents`` ``[N, c, h, w]`` (float16 by default), optional ``labels`` ``[N]`` and, in its
metadata, the captions (a JSON list), the class names, the source image shape and the codec's scaling, so a run
needs neither the images nor the VAE encoder. The latents are the codec's scaled latents
(``LatentCodec.encode``: ``(mean - shift_factor) * scaling_factor``), the space the teacher denoises in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffdistill.models.conditioning import Batch, Conditioning

FORMAT = "diffdistill-latents/1"
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _image_batch(dataset, idx: Tensor) -> Batch:
    """Samples ``idx`` of an in-memory (``get``) or encoded (``__getitem__ -> (uint8, label)``) dataset."""
    if hasattr(dataset, "get"):
        return dataset.get(idx)
    from diffdistill.data.loader import collate_uint8, to_batch

    return to_batch(*collate_uint8([dataset[int(i)] for i in idx]))


@torch.no_grad()
def encode_latents(
    dataset: Any,
    codec: nn.Module,
    out_path: str | Path,
    batch_size: int = 64,
    dtype: str = "float16",
    device: str | torch.device | None = None,
    limit: int | None = None,
) -> Path:
    """Encode every sample of ``dataset`` (in order; with ``xflip`` the mirrored half too) with ``codec`` (a
    :class:`~diffdistill.models.latent.LatentCodec`, posterior mean) and write one safetensors file at
    ``out_path`` (atomically) holding the latents, the labels and the captions. Returns the path."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got '{dtype}'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if n < 1:
        raise ValueError("the dataset to encode is empty")
    if device is None:
        p = next(codec.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    latents, labels, prompts = [], [], []
    for lo in range(0, n, batch_size):
        batch = _image_batch(dataset, torch.arange(lo, min(lo + batch_size, n)))
        if batch.x0 is None:
            raise ValueError(f"{type(dataset).__name__} serves no images to encode (a prompt-only dataset?)")
        latents.append(codec.encode(batch.x0.to(device)).to(DTYPES[dtype]).cpu())
        if batch.cond.class_labels is not None:
            labels.append(batch.cond.class_labels.cpu().long())
        if batch.prompts is not None:
            prompts += list(batch.prompts)
    tensors = {"latents": torch.cat(latents).contiguous()}
    if labels:
        tensors["labels"] = torch.cat(labels)
    meta = {
        "format": FORMAT,
        "source": str(getattr(dataset, "name", type(dataset).__name__)),
        "image_shape": json.dumps(list(_image_batch(dataset, torch.arange(1)).x0.shape[1:])),
        "num_classes": json.dumps(getattr(dataset, "num_classes", None)),
        "class_names": json.dumps(list(getattr(dataset, "class_names", None) or []) or None),
        "scaling_factor": json.dumps(getattr(codec, "scaling_factor", None)),
        "shift_factor": json.dumps(getattr(codec, "shift_factor", None)),
    }
    if prompts:
        if len(prompts) != n:
            raise ValueError(f"the dataset gave captions for {len(prompts)} of its {n} samples")
        meta["prompts"] = json.dumps(prompts)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return out


class LatentDataset:
    """The file of :func:`encode_latents` in memory: ``get(idx) -> Batch(x0=latents (float32), prompts=...)``.

    Args:
        path: the safetensors file.
        keep_labels: serve the class labels (when the file has them) beside the captions.
    """

    def __init__(self, path: str, keep_labels: bool = True):
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"latents file '{path}' does not exist (data.path); write one with "
                "diffdistill.data.latents.encode_latents(dataset, teacher.latent, path)"
            )
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on a corrupt file
            raise ValueError(f"'{path}' is not a readable safetensors file: {e}") from None
        if meta.get("format") != FORMAT or "latents" not in tensors:
            raise ValueError(f"'{path}' is not a diffdistill latents file (format {meta.get('format')!r})")
        self.path, self.meta = p, meta
        self.latents = tensors["latents"]
        n = self.latents.shape[0]
        labels = tensors.get("labels")
        self.prompts: list[str] | None = json.loads(meta["prompts"]) if "prompts" in meta else None
        if (labels is not None and labels.shape[0] != n) or (self.prompts is not None and len(self.prompts) != n):
            raise ValueError(f"'{path}': latents, labels and captions differ in length")
        self.labels = labels if keep_labels else None
        self.num_classes = json.loads(meta.get("num_classes", "null")) if self.labels is not None else None
        names = json.loads(meta.get("class_names", "null"))
        self.class_names = tuple(names) if names else None
        self.image_shape = tuple(json.loads(meta.get("image_shape", "[]")))
        self.scaling_factor = json.loads(meta.get("scaling_factor", "null"))
        self.shift_factor = json.loads(meta.get("shift_factor", "null"))
        self.name = f"latents-{meta.get('source', p.stem)}"

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    @property
    def captions(self) -> list[str] | None:
        """The distinct captions in file order (sample grids, evaluation)."""
        return list(dict.fromkeys(self.prompts)) if self.prompts is not None else None

    def get(self, idx: Tensor) -> Batch:
        labels = self.labels[idx] if self.labels is not None else None
        prompts = [self.prompts[i] for i in idx.tolist()] if self.prompts is not None else None
        return Batch(self.latents[idx].float(), Conditioning(class_labels=labels), prompts=prompts)


def main(argv: list[str] | None = None) -> Path:
    """``python -m diffdistill.data.latents PIPELINE OUT [data overrides]``: encode the ``data`` group's images (e.g.
    ``data=fashion_mnist_t2i``) with the VAE of the pipeline folder ``PIPELINE`` into the latents file ``OUT``
    (then train with ``data=latents data.path=OUT``)."""
    import argparse

    from hydra.utils import instantiate

    from diffdistill.cli.common import compose_config
    from diffdistill.models.latent import LatentCodec

    parser = argparse.ArgumentParser(prog="python -m diffdistill.data.latents", description=main.__doc__)
    parser.add_argument("pipeline", help="diffusers pipeline folder (or hub id) whose vae/ encodes the images")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("overrides", nargs="*", help="data overrides: data=fashion_mnist_t2i data.limit=1000")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    cfg = compose_config(["~experiment", *args.overrides], "train")
    dataset = instantiate(cfg.data)
    codec = LatentCodec.from_pretrained(args.pipeline).to(args.device)
    path = encode_latents(dataset, codec, args.out, args.batch_size, args.dtype, args.device)
    print(f"diffdistill: {len(dataset)} latents of {getattr(dataset, 'name', 'the data')} written to {path}")
    return path


if __name__ == "__main__":
    main()
