"""PNG plots of each metric against training step from a results JSON (matplotlib, Agg backend), and the
prompt-labelled sample grids of text-to-image runs."""

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


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """``text`` broken at spaces into at most ``max_lines`` lines of at most ``width`` px (the last one cut with
    an ellipsis when the text is longer)."""
    lines: list[str] = []
    for word in text.split() or [""]:
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += "..."
    for i, line in enumerate(lines):  # a single word wider than the cell
        while font.getlength(line) > width and len(line) > 1:
            line = line[:-4] + "..." if len(line) > 4 else line[:-1]
        lines[i] = line
    return lines


def prompt_grid_image(
    panels: list,
    prompts: list[str],
    labels: list[str] | None = None,
    title: str | None = None,
    min_cell: int = 96,
    max_lines: int = 4,
):
    """Sample grids of a text-to-image model, one column per prompt: image ``i`` of each panel (``[B, C, H, W]`` in
    ``[-1, 1]``, same seeds per cell) conditioned on ``prompts[i % len(prompts)]``. The prompts head the columns
    (wrapped), each panel (teacher, student, ...) is a block of rows under its label. Returns a PIL image."""
    from PIL import Image, ImageDraw

    from diffdistill.utils.images import BLACK, WHITE, _header, load_font, to_uint8

    if not prompts:
        raise ValueError("prompt_grid_image needs at least one prompt")
    if labels is not None and len(labels) != len(panels):
        raise ValueError(f"{len(labels)} labels for {len(panels)} panels")
    k = len(prompts)
    h, w = panels[0].shape[-2:]
    scale = max(1, -(-min_cell // max(h, w)))
    cw, ch, gap = w * scale, h * scale, 4
    width = k * cw + (k + 1) * gap
    font = load_font(max(9, min(14, cw // 8)))
    line_h = font.getbbox("Ag")[3] + 2
    wrapped = [_wrap(p or "(empty prompt)", font, cw - 4, max_lines) for p in prompts]
    head_h = max(len(x) for x in wrapped) * line_h + 2 * gap
    blocks = []
    for i, panel in enumerate(panels):
        imgs = to_uint8(panel.detach().float().cpu())
        if imgs.shape[1] == 1:
            imgs = imgs.expand(-1, 3, -1, -1)
        rows = -(-imgs.shape[0] // k)
        block = Image.new("RGB", (width, rows * (ch + gap)), WHITE)
        for j in range(imgs.shape[0]):
            cell = Image.fromarray(imgs[j].permute(1, 2, 0).numpy()).resize((cw, ch), Image.NEAREST)
            block.paste(cell, (gap + (j % k) * (cw + gap), (j // k) * (ch + gap)))
        if labels is not None:
            strip = _header(labels[i], width, max(11, min(20, width // 40)))
            both = Image.new("RGB", (width, strip.height + block.height), WHITE)
            both.paste(strip, (0, 0))
            both.paste(block, (0, strip.height))
            block = both
        blocks.append(block)
    top = _header(title, width, max(12, min(24, width // 32))) if title else None
    height = (top.height if top else 0) + head_h + sum(b.height for b in blocks) + gap
    canvas = Image.new("RGB", (width, height), WHITE)
    y = 0
    if top is not None:
        canvas.paste(top, (0, 0))
        y = top.height
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(wrapped):
        for n, line in enumerate(lines):
            x = gap + j * (cw + gap) + (cw - int(font.getlength(line))) // 2
            draw.text((x, y + gap + n * line_h), line, fill=BLACK, font=font)
    y += head_h
    for b in blocks:
        canvas.paste(b, (0, y))
        y += b.height
    return canvas
