"""``diffdistill-export``: a trained student as a diffusers pipeline folder (Hydra; see ``configs/export.yaml``)."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from diffdistill.cli.common import CONFIG_DIR, friendly_errors


def ema_option(value: Any) -> str | float | None:
    """``auto``, a decay, or ``None`` (``null``/``none``/``online``: the online weights)."""
    if value is None or str(value).lower() in ("null", "none", "online"):
        return None
    if str(value) == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"ema must be auto, a decay such as 0.999, or null; got {value!r}") from None


def run(cfg: DictConfig):
    """Export what ``cfg`` describes; returns the :class:`~diffdistill.export.ExportResult`."""
    from diffdistill.export import export

    if not cfg.get("source"):
        raise ValueError("give source=<run folder | checkpoint folder | generator model folder>")
    if not cfg.get("out"):
        raise ValueError("give out=<folder> (the pipeline folder to write)")
    result = export(
        cfg.source,
        cfg.out,
        ema=ema_option(cfg.get("ema", "auto")),
        gamma=None if cfg.get("gamma") is None else float(cfg.gamma),
        pipeline=str(cfg.get("pipeline", "auto")),
        lora=str(cfg.get("lora", "fuse")),
        overwrite=bool(cfg.get("overwrite", False)),
        push_to_hub=cfg.get("push_to_hub") or None,
        private=bool(cfg.get("hub_private", False)),
        verify=bool(cfg.get("verify", True)),
        base=cfg.get("base") or None,
    )
    print(f"diffdistill: exported {result.pipeline_class} to {result.path}")
    if result.verified:
        print(
            "  max |difference| to diffdistill's sampler: "
            + ", ".join(f"{k} {v:.2g}" for k, v in result.verified.items())
        )
    if cfg.get("push_to_hub"):
        print(f"  uploaded to https://huggingface.co/{cfg.push_to_hub}")
    return result


@hydra.main(config_path=CONFIG_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        run(cfg)


if __name__ == "__main__":
    main()
