"""Image datasets held in memory as uint8 and served as ``[-1, 1]`` float batches."""

from __future__ import annotations

import torch
from torch import Tensor

from diffdistill.data.transforms import horizontal_flip
from diffdistill.models.conditioning import Batch, Conditioning

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageTensorDataset:
    """uint8 images ``[N, C, H, W]`` with optional int labels; ``get(idx)`` returns floats in ``[-1, 1]``."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        num_classes: int | None = None,
        name: str = "images",
        class_names: tuple[str, ...] | None = None,
        xflip: bool = False,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels is not None and labels.shape[0] != images.shape[0]:
            raise ValueError("images and labels differ in length")
        if not isinstance(xflip, bool):
            raise ValueError(f"data.xflip must be true or false, got {xflip!r}")
        self.images, self.labels, self.name, self.class_names = images, labels, name, class_names
        self.num_classes = num_classes if labels is not None else None
        self.xflip = xflip

    def __len__(self) -> int:
        """Samples served: with ``xflip`` twice the images, the second half mirrored (see ``data/transforms.py``)."""
        return self.images.shape[0] * (2 if self.xflip else 1)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def get(self, idx: Tensor) -> Batch:
        raw = idx % self.images.shape[0] if self.xflip else idx
        images = self.images[raw]
        if self.xflip:  # the second half of the indices are the mirror images
            flipped = idx >= self.images.shape[0]
            images[flipped] = horizontal_flip(images[flipped])
        x0 = images.float() / 127.5 - 1.0
        labels = self.labels[raw] if self.labels is not None else None
        return Batch(x0, Conditioning(class_labels=labels))

    def uint8(self, idx: Tensor | slice) -> Tensor:
        return self.images[idx]


def ImageFolder(
    root: str,
    resolution: int,
    channels: int = 3,
    class_subfolders: bool = False,
    limit: int | None = None,
    resize: str = "center_crop",
    xflip: bool = False,
) -> ImageTensorDataset:
    """A plain folder of images (recursively), decoded into memory (``data/transforms.py``: centre-cropped and resized
    to ``resolution``, or with ``resize="none"`` required to have that size); ``xflip`` adds mirrored copies.

    With ``class_subfolders=True`` each first-level subfolder is a class (sorted by name). For folders too large for
    memory, :class:`~diffdistill.data.streaming.ImageFolderStream` decodes the same pixels on demand.
    """
    from diffdistill.data.streaming import ImageFolderStream

    folder = ImageFolderStream(root, resolution, channels, class_subfolders, resize, xflip, limit, num_workers=0)
    images = torch.stack([folder[i][0] for i in range(folder.num_raw())])
    labels = torch.tensor(folder.labels) if folder.labels is not None else None
    return ImageTensorDataset(
        images, labels, folder.num_classes, name=folder.name, class_names=folder.class_names, xflip=xflip
    )


class InfiniteBatcher:
    """Endless shuffled batches with an exactly resumable position (epoch, offset, seed).

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so saving ``state_dict()`` and loading
    it later continues the same sequence bit for bit.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._perm: Tensor | None = None

    def _permutation(self) -> Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(len(self.dataset), generator=g)
        return self._perm

    def next_indices(self) -> Tensor:
        """The dataset indices of the next batch (every process draws the same ones and takes its slice)."""
        n = len(self.dataset)
        if self.offset + self.batch_size > n:
            self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        idx = self._permutation()[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return idx

    def advance(self) -> None:
        """Move past one batch as :meth:`next_indices` does, without drawing the permutation."""
        if self.offset + self.batch_size > len(self.dataset):
            self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        self.offset += self.batch_size

    def next(self) -> Batch:
        return self.dataset.get(self.next_indices())

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self.seed, self._perm = state["epoch"], state["offset"], state["seed"], None


def SyntheticImages(
    num: int = 256, resolution: int = 8, channels: int = 1, num_classes: int = 10, seed: int = 0
) -> ImageTensorDataset:
    """Class-dependent random blobs (smoke tests and CI; no files needed).

    Class ``k`` is a Gaussian blob centred on a position that depends on ``k``, plus pixel noise.
    """
    for key, value, low in (("num", num, 1), ("resolution", resolution, 2), ("num_classes", num_classes, 1)):
        if value < low:
            raise ValueError(f"data.{key} must be >= {low}, got {value}")
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 or 3, got {channels}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")
    ang = labels.float() * (2 * torch.pi / num_classes)
    cx = (resolution - 1) / 2 * (1 + 0.6 * ang.cos())
    cy = (resolution - 1) / 2 * (1 + 0.6 * ang.sin())
    d2 = (xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2
    img = torch.exp(-d2 / (2 * (resolution / 6) ** 2)) + 0.05 * torch.randn(num, resolution, resolution, generator=g)
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8)[:, None].expand(-1, channels, -1, -1).contiguous()
    return ImageTensorDataset(img, labels, num_classes, name=f"synthetic-{resolution}-{seed}")
