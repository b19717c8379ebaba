"""Run logging: ``metrics.jsonl`` (always) plus accelerate's experiment trackers (TensorBoard, wandb, mlflow...).

The ``logger`` config group builds a :class:`LoggerConfig`; :func:`build_trackers` turns it into accelerate
tracker objects for ``Accelerator(log_with=...)`` and :class:`TrackerLogger` writes every record to the JSONL
file and to those trackers. :class:`MetricWindow` averages the per-iteration scalars between two records.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker
    from PIL import Image as PILImage

log = logging.getLogger("diffdistill")

# pip package each accelerate tracker needs
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "mlflow": "mlflow",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def tracker_choices() -> list[str]:
    """Tracker names accelerate knows (its built-ins plus any registered with ``register_tracker_class``)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


@dataclass
class LoggerConfig:
    """Where run records go besides ``metrics.jsonl`` (``configs/logger/*.yaml``).

    Args:
        trackers: accelerate tracker names (``tensorboard``, ``wandb``, ``mlflow``, ``comet_ml``, ``aim``,
            ``clearml``, ``dvclive``, ``swanlab``, ``trackio``); ``[]`` = JSONL only.
        project: the tracker project / experiment name.
        run_name: the run's name in the tracker (``null`` = the run folder's name).
        log_config: store the resolved run config as the run's hyperparameters.
        log_images: send sample grids to the trackers as images.
        init_kwargs: per-tracker keyword arguments, e.g. ``{wandb: {mode: offline}}`` or
            ``{tensorboard: {flush_secs: 30}}`` (passed to the tracker's constructor).
    """

    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "diffdistill"
    run_name: str | None = None
    log_config: bool = True
    log_images: bool = True
    init_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        trackers = self.trackers
        if isinstance(trackers, ListConfig):
            trackers = OmegaConf.to_container(trackers, resolve=True)
        if trackers is None:
            trackers = []
        elif isinstance(trackers, str):
            trackers = [trackers]
        self.trackers = [str(t) for t in trackers]
        if isinstance(self.init_kwargs, DictConfig):
            self.init_kwargs = OmegaConf.to_container(self.init_kwargs, resolve=True)
        self.init_kwargs = {str(k): dict(v or {}) for k, v in (self.init_kwargs or {}).items()}
        choices = tracker_choices()
        for name in self.trackers:
            if name not in choices:
                raise ValueError(
                    f"logger.trackers: unknown tracker '{name}'; valid choices: {', '.join(choices)} "
                    "(or [] for metrics.jsonl only)"
                )


def build_trackers(config: LoggerConfig, run_dir: str | Path) -> list[GeneralTracker]:
    """accelerate tracker objects for ``config`` (not started yet), files under ``run_dir``.

    TensorBoard writes to ``<run_dir>/tb``; wandb defaults to ``dir=<run_dir>`` and ``name=run_name``.
    Raises ``ValueError`` naming the package to install when a tracker's package is missing.
    """
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    run_dir = Path(run_dir)
    run_name = config.run_name or run_dir.name
    available = {str(t.value) if hasattr(t, "value") else str(t) for t in get_available_trackers()}
    trackers = []
    for name in dict.fromkeys(config.trackers):
        if name in TRACKER_PACKAGES and name not in available:
            pkg = TRACKER_PACKAGES[name]
            raise ValueError(
                f"logger.trackers: tracker '{name}' needs the '{pkg}' package, which is not installed "
                f"(pip install {pkg}), or choose another logger (logger=none: metrics.jsonl only)"
            )
        cls = LOGGER_TYPE_TO_CLASS[name]
        kwargs = dict(config.init_kwargs.get(name, {}))
        if name == "tensorboard":
            trackers.append(cls("tb", str(run_dir), **kwargs))
            continue
        if name == "wandb":
            kwargs.setdefault("name", run_name)
            kwargs.setdefault("dir", str(run_dir))
        elif name == "mlflow":
            kwargs.setdefault("run_name", run_name)
        if cls.requires_logging_directory:
            trackers.append(cls(config.project, str(run_dir), **kwargs))
        else:
            trackers.append(cls(config.project, **kwargs))
    return trackers


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as ``{"a.b.c": value}`` with only str / int / float / bool values (for hparams)."""
    out: dict[str, str | int | float | bool] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{key}."))
        elif isinstance(v, (str, int, float, bool)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


class RunLogger:
    """Append scalar records to ``<run>/metrics.jsonl`` and, optionally, a TensorBoard writer of its own.

    Args:
        run_dir: the run folder.
        tensorboard: also write TensorBoard event files under ``<run_dir>/tb`` (without accelerate trackers).
        enabled: write anything at all (``False`` on non-main processes).
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # pragma: no cover - tensorboard is a core dependency
                log.warning("tensorboard not installed: logging to metrics.jsonl only")

    def log(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        """Append one record (non-finite values are written as strings, e.g. ``"nan"``)."""
        if not self.enabled:
            return
        rec: dict[str, Any] = {"step": step, "kind": kind}
        for k, v in scalars.items():
            if isinstance(v, int) and not isinstance(v, bool):
                rec[k] = v
                finite = True
            else:
                v = float(v)
                finite = math.isfinite(v)
                rec[k] = v if finite else str(v)
            if self.tb is not None and finite:
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records newer than the checkpoint so the log matches the trajectory."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        """Close the TensorBoard writer; a failure or interrupt while closing is a warning, not an error."""
        if self.tb is not None:
            _safe_close("tensorboard", self.tb.close)
            self.tb = None


def _safe_close(name: str, close) -> None:
    try:
        close()
    except (Exception, KeyboardInterrupt) as e:  # closing must never hang the exit path with a traceback
        log.warning("closing the %s logger failed (%s: %s); its last records may be missing", name, type(e).__name__, e)


class TrackerLogger(RunLogger):
    """``metrics.jsonl`` plus the accelerate trackers of ``accelerator`` (started here, finished by :meth:`close`).

    Args:
        run_dir: the run folder.
        accelerator: built with ``log_with=build_trackers(config, run_dir)``.
        config: the logger settings.
        run_config: the resolved run config, stored as hyperparameters when ``config.log_config``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        accelerator: Accelerator,
        config: LoggerConfig,
        run_config: dict[str, Any] | None = None,
    ):
        super().__init__(run_dir, tensorboard=False, enabled=accelerator.is_main_process)
        self.accelerator, self.config = accelerator, config
        self._no_images: set[str] = set()
        hparams = flatten_config(run_config) if (run_config and config.log_config) else None
        accelerator.init_trackers(config.project, config=hparams)

    @property
    def trackers(self) -> list[GeneralTracker]:
        return list(self.accelerator.trackers) if self.enabled else []

    def log(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        """Append to the JSONL file and send the finite values to every tracker as ``<kind>/<key>``."""
        super().log(step, scalars, kind)
        values = {f"{kind}/{k}": float(v) for k, v in scalars.items() if math.isfinite(float(v))}
        if values and self.trackers:
            self.accelerator.log(values, step=step)

    def log_images(self, step: int, images: dict[str, PILImage.Image]) -> None:
        """Send RGB images to every tracker that takes them; one warning per tracker that cannot."""
        if not self.config.log_images or not images:
            return
        import numpy as np

        for tracker in self.trackers:
            name = getattr(tracker, "name", type(tracker).__name__)
            if name in self._no_images:
                continue
            try:
                if name == "tensorboard":
                    for tag, img in images.items():
                        tracker.writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
                    tracker.writer.flush()
                elif callable(getattr(tracker, "log_images", None)):
                    tracker.log_images({tag: [img] for tag, img in images.items()}, step=step)
                else:
                    raise NotImplementedError("the tracker has no log_images")
            except Exception as e:
                self._no_images.add(name)
                log.warning(
                    "tracker '%s' cannot take images (%s: %s); sample grids stay in samples/", name, type(e).__name__, e
                )

    def close(self) -> None:
        """Finish every tracker (each guarded: a failure or interrupt is a warning) and forget them."""
        for tracker in self.trackers:
            _safe_close(getattr(tracker, "name", type(tracker).__name__), tracker.finish)
        self.accelerator.trackers.clear()
        super().close()


class MetricWindow:
    """Per-iteration scalars between two log records: each key averaged over the iterations that had it.

    Non-finite values (the loss of a skipped update) stay out of the mean; a key that was never finite in the
    window reports its last value (``nan`` / ``inf``).

    Args:
        sum_keys: keys summed over the window instead (counts such as ``skipped``); always reported, 0 if absent.
    """

    def __init__(self, sum_keys: tuple[str, ...] = ()):
        self.sum_keys = tuple(sum_keys)
        self.reset()

    def reset(self) -> None:
        """Start an empty window."""
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._counts: dict[str, int] = dict.fromkeys(self.sum_keys, 0)

    def add(self, scalars: dict[str, float]) -> None:
        """Record one iteration's scalars."""
        for k, v in scalars.items():
            if k in self._counts:
                self._counts[k] += int(v)
                continue
            v = float(v)
            self._last[k] = v
            if math.isfinite(v):
                self._sum[k] = self._sum.get(k, 0.0) + v
                self._n[k] = self._n.get(k, 0) + 1

    def pop(self) -> dict[str, float | int]:
        """The window's means and counts; starts a new window."""
        out: dict[str, float | int] = {
            k: self._sum[k] / self._n[k] if k in self._n else v for k, v in self._last.items()
        }
        out.update(self._counts)
        self.reset()
        return out


def read_metrics(path: str | Path, kind: str | None = "train") -> list[dict]:
    """The records of a ``metrics.jsonl`` file, of one ``kind`` (``None``: all)."""
    recs = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    return [r for r in recs if kind is None or r.get("kind") == kind]
