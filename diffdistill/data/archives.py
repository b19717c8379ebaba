"""Sharded tar archives in the WebDataset layout, read by random access.

A WebDataset shard is a plain tar whose members are grouped into samples by key: ``dir/0001.png`` and
``dir/0001.cls`` are the image and the class of sample ``dir/0001`` (the key is the member path up to the first dot
of its file name). Each shard is indexed once (member offsets, from the tar headers; labels read then), after
which a sample is one read of its image bytes, so any position can be read directly and resume is exact.
Random access needs uncompressed ``.tar`` shards (WebDataset's usual format); compressed ones are refused.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from pathlib import Path

from diffdistill.data.streaming import EncodedImages

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(shards: str | list[str]) -> list[Path]:
    """Shard paths from a list, a glob (``data/*.tar``) or a brace range (``data/train-{000000..000009}.tar``)."""
    if isinstance(shards, str):
        patterns = [shards]
    elif isinstance(shards, (list, tuple)) or hasattr(shards, "__iter__"):
        patterns = [str(s) for s in shards]
    else:
        patterns = []
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"data.shards must be a path, glob, brace range or list of them, got {shards!r}")
    paths: list[Path] = []
    for pattern in patterns:
        m = _RANGE.search(pattern)
        if m:
            lo, hi = m.group(1), m.group(2)
            width = len(lo) if len(lo) == len(hi) else 0
            head, tail = pattern[: m.start()], pattern[m.end() :]
            names = [head + str(i).zfill(width) + tail for i in range(int(lo), int(hi) + 1)]
        elif any(c in pattern for c in "*?["):
            names = sorted(glob.glob(pattern))
            if not names:
                raise FileNotFoundError(f"no shards match '{pattern}' (data.shards)")
        else:
            names = [pattern]
        for name in names:
            if not Path(name).is_file():
                raise FileNotFoundError(f"shard '{name}' does not exist (data.shards)")
            paths.append(Path(name))
    return paths


def split_key(member: str) -> tuple[str, str]:
    """``dir/0001.seg.png`` -> ``("dir/0001", "seg.png")`` (the WebDataset grouping rule)."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_shard(path: Path, image_key: str | None, label_key: str | None) -> list[tuple[str, int, int, int | None]]:
    """``(key, data offset, size, label)`` of every sample in one uncompressed tar shard, in archive order."""
    try:
        tf = tarfile.open(path, "r:")
    except tarfile.ReadError as e:
        raise ValueError(
            f"shard '{path}' is not an uncompressed tar archive ({e}); random access needs plain .tar shards "
            "(data.shards), e.g. `gunzip` .tar.gz shards first"
        ) from e
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tf:
        for m in tf:
            if not m.isfile() or os.path.basename(m.name).startswith("."):
                continue
            key, ext = split_key(m.name)
            samples.setdefault(key, {})[ext] = m
        out = []
        for key, fields in samples.items():
            image_ext = image_key or next((e for e in IMAGE_KEYS if e in fields), None)
            if image_ext not in fields:
                want = image_key or "/".join(IMAGE_KEYS)
                raise ValueError(f"shard '{path}': sample '{key}' has no .{want} member (data.image_key)")
            label = None
            if label_key is not None:
                if label_key not in fields:
                    raise ValueError(f"shard '{path}': sample '{key}' has no .{label_key} member (data.label_key)")
                text = tf.extractfile(fields[label_key]).read().decode().strip()
                try:
                    label = int(text)
                except ValueError as e:
                    raise ValueError(
                        f"shard '{path}': label '{key}.{label_key}' is {text[:20]!r}, not an integer (data.label_key)"
                    ) from e
            m = fields[image_ext]
            out.append((key, m.offset_data, m.size, label))
    return out


class TarShards(EncodedImages):
    """Images (and optional integer class labels) from WebDataset-style tar shards.

    Args:
        shards: a path, glob, brace range (``train-{000000..000099}.tar``) or list of them.
        resolution, channels, resize, xflip: as :class:`~diffdistill.data.streaming.EncodedImages`.
        image_key: the image member's extension (``null`` = the first of png, jpg, jpeg, webp, bmp present).
        label_key: the label member's extension (a text integer, e.g. ``cls``); ``null`` = unconditional.
        num_classes: number of classes (``null`` = largest label + 1).
        limit: use only the first ``limit`` samples.
        num_workers, prefetch_factor, pin_memory: the decoding loader's options.
    """

    def __init__(
        self,
        shards: str | list[str],
        resolution: int = 32,
        channels: int = 3,
        image_key: str | None = None,
        label_key: str | None = "cls",
        num_classes: int | None = None,
        resize: str = "center_crop",
        xflip: bool = False,
        limit: int | None = None,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        pin_memory: bool | str = "auto",
    ):
        super().__init__(resolution, channels, resize, xflip, num_workers, prefetch_factor, pin_memory)
        for key, value in (("image_key", image_key), ("label_key", label_key)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"data.{key} must be a file extension such as 'png' or null, got {value!r}")
        self.shards = expand_shards(shards)
        self.members: list[tuple[int, int, int]] = []  # (shard, offset, size)
        self.keys: list[str] = []
        labels: list[int] = []
        for s, path in enumerate(self.shards):
            for key, offset, size, label in index_shard(path, image_key and image_key.lower(), label_key):
                self.members.append((s, offset, size))
                self.keys.append(key)
                if label is not None:
                    labels.append(label)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"data.limit must be a positive integer or null, got {limit!r}")
            self.members, self.keys, labels = self.members[:limit], self.keys[:limit], labels[:limit]
        if not self.members:
            raise FileNotFoundError(f"no samples in the shards {[str(p) for p in self.shards]} (data.shards)")
        if label_key is not None:
            if min(labels) < 0:
                raise ValueError(f"labels must be >= 0, found {min(labels)} (data.label_key)")
            found = max(labels) + 1
            if num_classes is not None and (not isinstance(num_classes, int) or num_classes < found):
                raise ValueError(
                    f"data.num_classes must be an integer >= {found} (the largest label + 1), got {num_classes!r}"
                )
            self.labels, self.num_classes = labels, num_classes or found
        self.name = f"tar-{self.shards[0].stem}-{resolution}"

    def num_raw(self) -> int:
        return len(self.members)

    def identity(self):
        for (s, offset, size), key in zip(self.members, self.keys):
            yield self.shards[s].name, key, offset, size
        yield tuple(self.labels or ())

    def source(self, raw_index: int) -> tuple[bytes, str]:
        s, offset, size = self.members[raw_index]
        with open(self.shards[s], "rb") as f:  # opened per read: safe in forked workers
            f.seek(offset)
            data = f.read(size)
        return data, f"{self.shards[s]}:{self.keys[raw_index]}"
