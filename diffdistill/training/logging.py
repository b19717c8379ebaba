"""Run logging: JSONL (always) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("diffdistill")


class RunLogger:
    """Append scalar records to ``<run>/metrics.jsonl`` and, optionally, TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # pragma: no cover - tensorboard is a core dependency
                log.warning("tensorboard not installed: logging to metrics.jsonl only")

    def log(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        rec = {"step": step, "kind": kind}
        for k, v in scalars.items():
            v = float(v)
            rec[k] = v if math.isfinite(v) else str(v)
            if self.tb is not None and math.isfinite(v):
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records newer than the checkpoint so the log matches the trajectory."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path, kind: str | None = "train") -> list[dict]:
    recs = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    return [r for r in recs if kind is None or r.get("kind") == kind]
