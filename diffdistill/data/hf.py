"""Image datasets of the Hugging Face ``datasets`` library (optional extra ``diffdistill[data]``).

``path`` is a folder written by ``Dataset.save_to_disk`` (read with ``load_from_disk``), or anything
``load_dataset`` takes: a local data folder (e.g. an ``imagefolder`` or parquet files) or a hub id, which needs a
network the first time (then the local cache; with ``HF_HUB_OFFLINE=1`` only the cache). The Arrow table is
memory-mapped, not read into memory; images are decoded by the loader's workers with the same decoding as image
folders.
"""

from __future__ import annotations

from pathlib import Path

from diffdistill.data.streaming import EncodedImages


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:400]


def load_hf_dataset(path: str, split: str):
    """The ``split`` of the dataset at ``path`` (a ``save_to_disk`` folder, a data folder or a hub id)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("data=hf_datasets needs the `datasets` package: pip install 'diffdistill[data]'") from e
    if not isinstance(path, str) or not path:
        raise ValueError(f"data.path must be a folder or a Hugging Face hub id, got {path!r}")
    local = Path(path).expanduser()
    if (path.startswith(("/", "./", "../", "~")) or local.is_absolute()) and not local.exists():
        raise FileNotFoundError(f"dataset folder '{path}' does not exist (data.path); a hub id looks like 'user/name'")
    saved = Path(path).is_dir() and any((Path(path) / f).exists() for f in ("state.json", "dataset_dict.json"))
    try:
        ds = datasets.load_from_disk(path) if saved else datasets.load_dataset(path, split=split)
    except Exception as e:  # the library raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        raise ValueError(f"could not load the Hugging Face dataset '{path}' (data.path): {_one_line(e)}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"data.split '{split}' is not a split of '{path}' (it has {sorted(ds)})")
        ds = ds[split]
    return ds


class HFImages(EncodedImages):
    """Images (and optional class labels) from a Hugging Face ``datasets`` dataset.

    Args:
        path: a ``save_to_disk`` folder, a local data folder or a hub id.
        split: the split to read.
        image_column: the column of ``Image`` feature (or of ``{"bytes", "path"}`` dicts).
        label_column: an integer or ``ClassLabel`` column; ``null`` = unconditional.
        num_classes: number of classes (``null`` = from the ``ClassLabel`` feature, else the largest label + 1).
        resolution, channels, resize, xflip, limit, num_workers, prefetch_factor, pin_memory: as
            :class:`~diffdistill.data.streaming.ImageFolderStream`.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = "label",
        num_classes: int | None = None,
        resolution: int = 32,
        channels: int = 3,
        resize: str = "center_crop",
        xflip: bool = False,
        limit: int | None = None,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        pin_memory: bool | str = "auto",
    ):
        super().__init__(resolution, channels, resize, xflip, num_workers, prefetch_factor, pin_memory)
        import datasets

        ds = load_hf_dataset(path, split)
        columns = list(ds.column_names)
        if image_column not in columns:
            raise ValueError(f"data.image_column '{image_column}' is not a column of '{path}' (columns: {columns})")
        if label_column is not None and label_column not in columns:
            raise ValueError(
                f"data.label_column '{label_column}' is not a column of '{path}' (columns: {columns}); "
                "null for unconditional data"
            )
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"data.limit must be a positive integer or null, got {limit!r}")
            ds = ds.select(range(min(limit, len(ds))))
        if len(ds) == 0:
            raise FileNotFoundError(f"the split '{split}' of '{path}' is empty (data.path)")
        if label_column is not None:
            feature = ds.features[label_column]
            labels = [int(v) for v in ds[label_column]]
            if min(labels) < 0:
                raise ValueError(f"labels must be >= 0, found {min(labels)} (data.label_column)")
            if isinstance(feature, datasets.ClassLabel):
                self.class_names = tuple(feature.names)
            found = len(self.class_names) if self.class_names else max(labels) + 1
            if num_classes is not None and (not isinstance(num_classes, int) or num_classes < max(labels) + 1):
                raise ValueError(
                    f"data.num_classes must be an integer > the largest label {max(labels)}, got {num_classes!r}"
                )
            self.labels, self.num_classes = labels, num_classes or found
        if isinstance(ds.features[image_column], datasets.Image):  # keep the encoded bytes: decoded by the workers
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.table, self.image_column, self.path = ds.select_columns([image_column]), image_column, path
        self.name = f"hf-{Path(path).name or path}-{split}-{resolution}"

    def num_raw(self) -> int:
        return len(self.table)

    def identity(self):
        yield len(self.table), self.image_column, getattr(self.table, "_fingerprint", None)
        yield tuple(self.labels or ())

    def source(self, raw_index: int) -> tuple[str | bytes, str]:
        cell = self.table[raw_index][self.image_column]
        name = f"{self.path}[{raw_index}]"
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return cell["bytes"], (f"{name} ({cell['path']})" if cell.get("path") else name)
            if cell.get("path"):
                return cell["path"], f"{name} ({cell['path']})"
        if isinstance(cell, (bytes, str)):
            return cell, name
        raise ValueError(f"{name}: the cell of data.image_column '{self.image_column}' holds no image bytes or path")
