"""The data stream the trainer reads: this process's micro-batches of each iteration, exactly resumable.

One interface for every dataset. In-memory datasets (``get(idx) -> Batch``: toys, Fashion-MNIST, in-memory image
folders) are sliced directly. Encoded datasets (``__getitem__(i) -> (uint8 image, label)``: streamed image
folders, tar shards, Hugging Face datasets) are decoded by a ``torch.utils.data.DataLoader`` with workers,
prefetching and pinned memory, driven by a batch sampler that replays the same positions.

Both follow :class:`~diffdistill.data.images.InfiniteBatcher`: the global batch of each iteration is a slice of
a permutation that depends only on ``(seed, epoch)``, and micro-batch ``v`` (virtual rank ``rank x accumulation +
k``) is its ``v``-th slice. Each process reads only its own slices, so ranks see disjoint samples that together
cover each epoch, and every process sees the samples it would see with the data held in memory. The position
saved is the number of iterations the trainer *consumed* (not what the workers prefetched), so a resumed run
continues with the exact next micro-batch, bit for bit, whatever ``num_workers`` is, as long as the files are
unchanged (their count, and for encoded data their names and sizes, are checked on resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffdistill.data.images import InfiniteBatcher
from diffdistill.models.conditioning import Batch, Conditioning


@dataclass
class LoaderOptions:
    """How an encoded dataset is decoded (``data.num_workers``, ``data.prefetch_factor``, ``data.pin_memory``).

    Args:
        num_workers: decoding processes (0 = in the training process).
        prefetch_factor: micro-batches each worker decodes ahead.
        pin_memory: page-locked host batches for asynchronous copies to the GPU; ``"auto"`` = on when training on
            CUDA.
    """

    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool | str = "auto"

    def __post_init__(self) -> None:
        for key, low in (("num_workers", 0), ("prefetch_factor", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{key} must be an integer >= {low}, got {value!r}")
        if self.pin_memory not in (True, False, "auto"):
            raise ValueError(f"data.pin_memory must be true, false or auto, got {self.pin_memory!r}")


def collate_uint8(samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor | None]:
    """Stack ``(uint8 image, label)`` pairs; labels ``-1`` (unconditional data) give ``None``."""
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
    return images, (None if bool((labels < 0).all()) else labels)


def to_batch(images: Tensor, labels: Tensor | None) -> Batch:
    """uint8 images to a ``[-1, 1]`` float :class:`Batch` (the same arithmetic as ``ImageTensorDataset.get``)."""
    return Batch(images.float() / 127.5 - 1.0, Conditioning(class_labels=labels))


class MicroBatchSampler:
    """Endless lists of dataset indices: this process's micro-batches, iteration after iteration, from a saved
    :class:`InfiniteBatcher` position on (the ``batch_sampler`` of the ``DataLoader``)."""

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, virtual_ranks: list[int], state: dict):
        self.num_samples, self.global_batch, self.micro_batch = num_samples, global_batch, micro_batch
        self.virtual_ranks, self.state = list(virtual_ranks), dict(state)

    def __iter__(self):
        position = InfiniteBatcher(range(self.num_samples), self.global_batch)
        position.load_state_dict(self.state)
        b = self.micro_batch
        while True:
            idx = position.next_indices()
            for v in self.virtual_ranks:
                yield idx[v * b : (v + 1) * b].tolist()


class DataStream:
    """This process's micro-batches, one iteration at a time (see the module docstring).

    Args:
        dataset: in-memory (``get(idx) -> Batch``) or encoded (``__getitem__(i) -> (uint8 [C, H, W], label)``,
            with an optional ``loader`` :class:`LoaderOptions`).
        micro_batch: samples per micro-batch (``trainer.batch_size``).
        accumulation: micro-batches per process and iteration.
        world_size, rank: the processes and this one's index.
        seed: the permutation seed.
        device: where batches are delivered (encoded data crosses as uint8, then becomes float there).
    """

    def __init__(
        self,
        dataset: Any,
        micro_batch: int,
        accumulation: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.dataset, self.micro_batch, self.device = dataset, micro_batch, torch.device(device)
        self.virtual_ranks = [rank * accumulation + k for k in range(accumulation)]
        self.position = InfiniteBatcher(dataset, micro_batch * accumulation * world_size, seed=seed)
        self.in_memory = hasattr(dataset, "get")
        self.options = getattr(dataset, "loader", None) or LoaderOptions(num_workers=0)
        self._iterator = None

    @property
    def streamed(self) -> bool:
        """Whether batches are decoded by a ``DataLoader`` (encoded data) rather than sliced from memory."""
        return not self.in_memory

    def _loader(self):
        from torch.utils.data import DataLoader

        o = self.options
        pin = (self.device.type == "cuda") if o.pin_memory == "auto" else bool(o.pin_memory)
        position = self.position
        sampler = MicroBatchSampler(
            len(self.dataset), position.batch_size, self.micro_batch, self.virtual_ranks, position.state_dict()
        )
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=o.num_workers,
            prefetch_factor=o.prefetch_factor if o.num_workers > 0 else None,
            pin_memory=pin and torch.cuda.is_available(),
            persistent_workers=False,
            collate_fn=collate_uint8,
        )

    def next(self) -> list[tuple[int, Batch]]:
        """The next iteration's micro-batches of this process, as ``(virtual rank, batch on device)``."""
        if self.in_memory:
            idx, b = self.position.next_indices(), self.micro_batch
            return [(v, self.dataset.get(idx[v * b : (v + 1) * b]).to(self.device)) for v in self.virtual_ranks]
        if self._iterator is None:
            self._iterator = iter(self._loader())
        out = []
        for v in self.virtual_ranks:
            images, labels = next(self._iterator)
            images = images.to(self.device, non_blocking=True)
            labels = None if labels is None else labels.to(self.device, non_blocking=True)
            out.append((v, to_batch(images, labels)))
        self.position.advance()
        return out

    def state_dict(self) -> dict:
        """The consumed position ``(epoch, offset, seed)``, the dataset's length and, for encoded data, the
        fingerprint of its files (plain values)."""
        state = {**self.position.state_dict(), "num_samples": len(self.dataset)}
        fingerprint = getattr(self.dataset, "fingerprint", None)
        return state if fingerprint is None else {**state, "fingerprint": fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses a position saved over a dataset of another length or other files."""
        saved = state.get("num_samples")
        if saved is not None and int(saved) != len(self.dataset):
            raise ValueError(
                f"the checkpoint's data position was saved over {saved} samples, but the data group now has "
                f"{len(self.dataset)}: the files changed, so the run cannot continue the same sequence"
            )
        mine = getattr(self.dataset, "fingerprint", None)
        if state.get("fingerprint") is not None and mine is not None and state["fingerprint"] != mine:
            raise ValueError(
                "the checkpoint's data position was saved over other files (names or sizes differ from the data "
                "group's now): the run cannot continue the same sequence; point the data group at the original files"
            )
        self.position.load_state_dict(state)
        self.close()

    def close(self) -> None:
        """Stop the decoding workers (a new iterator starts at the current position on the next call)."""
        self._iterator = None  # the DataLoader iterator shuts its workers down when released
