"""PNG plots of each metric against training step from a results JSON (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffdistill.evaluation.harness import read_results

NON_METRICS = {"step", "checkpoint", "ema", "sampler_steps", "seconds"}


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    """Numeric columns of the results rows, in first-seen order."""
    names: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in NON_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
                names[k] = None
    return list(names)


def plot_results(
    results: str | Path | dict[str, Any], out: str | Path | None = None, metrics: list[str] | None = None
) -> Path:
    """One subplot per metric vs step, one line per (EMA track, sampler steps). Returns the PNG path
    (default: next to the JSON, ``<name>.png``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    doc = read_results(results) if not isinstance(results, dict) else results
    rows = [r for r in doc.get("results", []) if r.get("step") is not None]
    fixed = [r for r in doc.get("results", []) if r.get("step") is None]  # e.g. the teacher: a horizontal line
    if not rows:
        raise ValueError("no results with a training step to plot")
    names = metrics or metric_names(rows)
    if out is None:
        if isinstance(results, dict):
            raise ValueError("give `out` when plotting an in-memory results dict")
        out = Path(results).with_suffix(".png")
    out = Path(out)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    tracks = sorted({(str(r.get("ema")), r.get("sampler_steps")) for r in rows}, key=str)
    proto = doc.get("protocol", {})
    ex = (proto.get("extractor") or {}).get("extractor", "?")
    for ax, name in zip(axes[0], names):
        for ema, steps in tracks:
            pts = sorted(
                (r["step"], r[name])
                for r in rows
                if str(r.get("ema")) == ema and r.get("sampler_steps") == steps and name in r
            )
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, label=f"ema={ema}, steps={steps}")
        for r in fixed:
            if name in r:
                label = f"{r.get('kind') or 'reference'}: {r.get('checkpoint')}"
                ax.axhline(r[name], ls="--", lw=1, color="gray", label=label)
        ax.set_title(f"{name} ({ex}, n={proto.get('num_images', '?')})", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
