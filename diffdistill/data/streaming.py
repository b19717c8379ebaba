"""Image datasets decoded on demand (by ``DataLoader`` workers) instead of held in memory.

Each is map-style: ``__getitem__(i)`` returns ``(uint8 [C, H, W], label)`` (label ``-1`` when unconditional), so
the trainer's :class:`~diffdistill.data.loader.DataStream` reads any position directly, and resume is exact.
Subclasses say where sample ``i``'s encoded bytes are (:meth:`EncodedImages.source`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import Tensor

from diffdistill.data.images import IMAGE_EXTENSIONS
from diffdistill.data.loader import LoaderOptions
from diffdistill.data.transforms import check_image_options, decode_image, horizontal_flip, xflip_index


class EncodedImages:
    """Base of the decoded-on-demand datasets.

    Args:
        resolution: side of the square images served.
        channels: 1 (grayscale) or 3 (RGB).
        resize: ``center_crop`` (crop the central square, resize bicubic) or ``none`` (every image must already be
            ``resolution x resolution``; another size is an error naming the file).
        xflip: append the mirror image of every sample (the dataset doubles; flips fixed by the index).
        num_workers, prefetch_factor, pin_memory: the :class:`LoaderOptions` of the decoding ``DataLoader``.
    """

    def __init__(
        self,
        resolution: int,
        channels: int = 3,
        resize: str = "center_crop",
        xflip: bool = False,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        pin_memory: bool | str = "auto",
    ):
        check_image_options(resolution, channels, resize)
        if not isinstance(xflip, bool):
            raise ValueError(f"data.xflip must be true or false, got {xflip!r}")
        self.resolution, self.channels, self.resize, self.xflip = resolution, channels, resize, xflip
        self.loader = LoaderOptions(num_workers, prefetch_factor, pin_memory)
        self.labels: list[int] | None = None
        self.num_classes: int | None = None
        self.class_names: tuple[str, ...] | None = None
        self.name = "encoded-images"

    # subclasses: the number of raw samples and where each one's encoded image is
    def num_raw(self) -> int:
        raise NotImplementedError

    def source(self, raw_index: int) -> tuple[str | Path | bytes, str]:
        """``(path or encoded bytes, name for error messages)`` of raw sample ``raw_index``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_raw() * (2 if self.xflip else 1)

    @property
    def fingerprint(self) -> str:
        """A digest of what identifies the samples (names and sizes, settings), saved with the data position so a
        resume over other files is refused; computed once."""
        if getattr(self, "_fingerprint", None) is None:
            digest = hashlib.sha256(repr((type(self).__name__, self.sample_shape, self.resize, self.xflip)).encode())
            for item in self.identity():
                digest.update(repr(item).encode())
            self._fingerprint = digest.hexdigest()[:32]
        return self._fingerprint

    def identity(self):
        """What :attr:`fingerprint` digests, one item per sample (subclasses: name and size)."""
        return range(self.num_raw())

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        raw, flipped = xflip_index(int(index), self.num_raw(), self.xflip)
        data, name = self.source(raw)
        image = decode_image(data, self.resolution, self.channels, self.resize, name=name)
        if flipped:
            image = horizontal_flip(image)
        return image, (self.labels[raw] if self.labels is not None else -1)


def list_image_files(root: str, limit: int | None = None) -> list[Path]:
    """Image files under ``root`` (recursively, sorted); a missing folder or none found is an error naming
    ``data.root``."""
    root_p = Path(root)
    if not root_p.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist (data.root)")
    files = sorted(p for p in root_p.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"data.limit must be a positive integer or null, got {limit!r}")
        files = files[:limit]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under '{root}' (data.root)")
    return files


class ImageFolderStream(EncodedImages):
    """A folder of images (recursively, sorted by path), decoded by the loader's workers.

    The same pixels as the in-memory :func:`~diffdistill.data.ImageFolder` (same decoding), without reading the
    folder into memory first. With ``class_subfolders=True`` each first-level subfolder is a class (sorted).
    Other arguments: :class:`EncodedImages`.
    """

    def __init__(
        self,
        root: str,
        resolution: int = 32,
        channels: int = 3,
        class_subfolders: bool = False,
        resize: str = "center_crop",
        xflip: bool = False,
        limit: int | None = None,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        pin_memory: bool | str = "auto",
    ):
        super().__init__(resolution, channels, resize, xflip, num_workers, prefetch_factor, pin_memory)
        self.root = Path(root)
        self.files = list_image_files(root, limit)
        if class_subfolders:
            parts = [p.relative_to(self.root).parts for p in self.files]
            if any(len(q) < 2 for q in parts):
                loose = next(p for p, q in zip(self.files, parts) if len(q) < 2)
                raise ValueError(f"data.class_subfolders=true but '{loose}' is not inside a class subfolder")
            classes = sorted({q[0] for q in parts})
            lookup = {c: i for i, c in enumerate(classes)}
            self.labels = [lookup[q[0]] for q in parts]
            self.num_classes, self.class_names = len(classes), tuple(classes)
        self.name = f"folder-{self.root.name}-{resolution}"

    def num_raw(self) -> int:
        return len(self.files)

    def source(self, raw_index: int) -> tuple[Path, str]:
        path = self.files[raw_index]
        return path, str(path)

    def identity(self):
        for p, label in zip(self.files, self.labels or [None] * len(self.files)):
            yield p.relative_to(self.root).as_posix(), p.stat().st_size, label
