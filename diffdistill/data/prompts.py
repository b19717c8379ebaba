"""Prompt datasets: captions without images (a text file, a COCO captions JSON) and images with captions.

A prompt-only dataset serves ``Batch(x0=None, prompts=[...])``: data-free objectives (DMD, SiD, ...) need nothing
else, and the trainer encodes the prompts with the teacher's text encoder before the objective sees the batch
(``diffdistill/training/conditioning.py``). Every dataset here is deterministic and in memory (``get(idx)`` /
``__len__``), so :class:`~diffdistill.data.images.InfiniteBatcher` and the data stream slice it like any other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from diffdistill.data.images import ImageTensorDataset
from diffdistill.models.conditioning import Batch, Conditioning


class PromptDataset:
    """Captions held in memory; ``get(idx)`` returns a batch of prompts and no samples.

    Args:
        prompts: one caption per sample.
        name: the dataset's name (results JSONs, logs).
        image_ids: optional id of each caption's image (COCO).
    """

    sample_shape = None  # prompt-only: no real samples (objectives with requires_real_data refuse it)
    num_classes = None

    def __init__(self, prompts: Sequence[str], name: str = "prompts", image_ids: Sequence[int] | None = None):
        self.prompts = [str(p) for p in prompts]
        if not self.prompts:
            raise ValueError(f"the prompt dataset '{name}' holds no prompts")
        if image_ids is not None and len(image_ids) != len(self.prompts):
            raise ValueError("prompts and image_ids differ in length")
        self.name, self.image_ids = name, None if image_ids is None else list(image_ids)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def captions(self) -> list[str]:
        """The distinct prompts in dataset order (sample grids, evaluation)."""
        return list(dict.fromkeys(self.prompts))

    def get(self, idx: Tensor) -> Batch:
        return Batch(None, Conditioning(), prompts=[self.prompts[i] for i in idx.tolist()])


def _read_text(path: str | Path, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist (data.path)")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"could not read {what} '{path}' as UTF-8 text: {e}") from e


def _limited(items: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise ValueError(f"data.limit must be >= 1 or null, got {limit}")
    return items[:limit] if limit is not None else items


def PromptFile(path: str, limit: int | None = None) -> PromptDataset:
    """One prompt per line of a UTF-8 text file; blank lines and lines starting with ``#`` are skipped, the others
    stripped of surrounding white space."""
    lines = [line.strip() for line in _read_text(path, "prompt file").splitlines()]
    prompts = _limited([s for s in lines if s and not s.startswith("#")], limit)
    if not prompts:
        raise ValueError(f"prompt file '{path}' holds no prompts (only blank lines or # comments)")
    return PromptDataset(prompts, name=f"prompts-{Path(path).stem}")


def CocoCaptions(path: str, limit: int | None = None) -> PromptDataset:
    """The captions of a COCO ``captions_*.json`` (``annotations[*].caption`` with its ``image_id``), in file
    order (every caption of an image is its own sample)."""
    try:
        doc = json.loads(_read_text(path, "COCO captions file"))
    except json.JSONDecodeError as e:
        raise ValueError(f"COCO captions file '{path}' is not valid JSON: {e}") from None
    anns = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"'{path}' is not a COCO captions file: it has no 'annotations' list")
    bad = [i for i, a in enumerate(anns) if not isinstance(a, dict) or not isinstance(a.get("caption"), str)]
    if bad:
        raise ValueError(f"'{path}': annotation {bad[0]} has no 'caption' string ({len(bad)} such annotations)")
    anns = _limited([a for a in anns if a["caption"].strip()], limit)
    if not anns:
        raise ValueError(f"COCO captions file '{path}' holds no captions")
    split = Path(path).stem.removeprefix("captions_")
    return PromptDataset(
        [a["caption"].strip() for a in anns], name=f"coco_captions-{split}", image_ids=[a.get("image_id") for a in anns]
    )


class CaptionedImages(ImageTensorDataset):
    """A class-labelled image dataset whose samples also carry a caption: ``prompt_template`` filled with the word
    of the sample's class (``"a photo of a {}"``; ``words`` default to the class names). With ``keep_labels=False``
    the batches carry no class labels (a text-to-image run conditions on the prompts only)."""

    def __init__(
        self,
        base: ImageTensorDataset,
        prompt_template: str,
        keep_labels: bool = True,
        words: Sequence[str] | None = None,
    ):
        words = tuple(words) if words is not None else base.class_names
        if base.labels is None or not words:
            raise ValueError("captions from class names need a dataset with labels and class names (or words)")
        n = base.num_classes if base.num_classes is not None else int(base.labels.max()) + 1
        if len(words) < n:
            raise ValueError(f"{len(words)} caption words for {n} classes")
        if "{}" not in prompt_template:
            raise ValueError(f"data.prompts must contain '{{}}' (filled with the class name), got {prompt_template!r}")
        names = base.class_names or words
        super().__init__(base.images, base.labels, base.num_classes, base.name, names, base.xflip)
        self.prompt_template, self.keep_labels, self.words = prompt_template, bool(keep_labels), words
        if not self.keep_labels:
            self.num_classes = None

    @property
    def captions(self) -> list[str]:
        """One prompt per class, in class order."""
        return [self.prompt_template.format(w) for w in self.words]

    def get(self, idx: Tensor) -> Batch:
        batch = super().get(idx)
        raw = idx % self.images.shape[0] if self.xflip else idx
        prompts = [self.captions[int(k)] for k in self.labels[raw].tolist()]
        cond = batch.cond if self.keep_labels else Conditioning()
        return Batch(batch.x0, cond, prompts=prompts)


def dataset_prompts(dataset, limit: int | None = None) -> list[str] | None:
    """The distinct prompts of ``dataset`` in its order (``None`` for data without captions)."""
    captions = getattr(dataset, "captions", None)
    if captions is None:
        return None
    captions = list(captions)
    return captions[:limit] if limit is not None else captions
