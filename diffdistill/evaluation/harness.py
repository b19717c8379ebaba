"""The evaluation harness: ``Evaluator(...)(model, step) -> {metric: value}`` and results JSONs.

The same object serves ``diffdistill-eval`` and in-loop evaluation in the trainer::

    evaluator = Evaluator(extractor="effnet_lite0", reference=FashionMNIST(split="test"), num_images=1000,
                          metrics=["fid", "kid"])
    scores = evaluator(generator, step=5000)          # {"fid": ..., "kid": ...}
    write_results("results.json", evaluator.protocol(), [evaluator.record(scores, step=5000)])
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffdistill.evaluation import metrics as M
from diffdistill.evaluation.extractors import CLIP, FeatureExtractor, build_extractor
from diffdistill.evaluation.generation import (
    CondFn,
    class_conditioning,
    iter_generate,
    prompt_conditioning,
    sampler_spec,
)
from diffdistill.evaluation.reference import ReferenceStats, describe_dataset, reference_stats

METRICS = ("fid", "kid", "precision", "recall", "clip_score", "clip_fid")
RESULTS_FORMAT = "diffdistill-eval-results/1"


def _instantiate(obj: Any) -> Any:
    """Build a Hydra ``_target_`` mapping (dict or DictConfig) if one was passed instead of an object."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(obj, DictConfig):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, dict) and "_target_" in obj:
        from hydra.utils import instantiate

        return instantiate(obj)
    return obj


class Evaluator:
    """Generate ``num_images`` samples with per-sample seeds and score them against a reference dataset.

    Args:
        extractor: feature-extractor id (``effnet_lite0``, ``inception``, ``clip_<arch>``, ``random_cnn``) or
            an instance; used for ``fid``, ``kid``, ``precision``, ``recall``.
        reference: the real dataset (``ImageTensorDataset``, e.g. ``FashionMNIST(split="test")``), a uint8
            tensor, or a ``_target_`` config of one. Required for every metric except ``clip_score``.
        num_images: number of generated images (sample ``i`` is seeded by ``seed + i``).
        metrics: any of ``fid``, ``kid``, ``precision``, ``recall``, ``clip_score``, ``clip_fid``.
        seed: first seed of the range ``seed .. seed + num_images - 1``.
        batch_size: generation and feature-extraction batch (does not change the results).
        extractor_kwargs: constructor arguments of the extractor (``weights``, ``input_size``, ``seed``...).
        num_reference: reference images used (``None`` = all; a subset is drawn with ``reference_seed``).
        reference_split: split tag for the cache key (default: parsed from the dataset name).
        sampler_steps: generator steps (prefix of ``sampling_sigmas``) or teacher Heun steps (default 18).
        sigmas: explicit sampler sigmas (overrides ``sampler_steps``).
        num_classes: class-conditional generation with labels ``i % num_classes``; ``"auto"`` takes the model's.
        clip: CLIP extractor id (``clip_<arch>``) or instance for ``clip_score`` / ``clip_fid``.
        clip_kwargs: constructor arguments of the CLIP extractor (``checkpoint=``).
        prompts: captions for CLIP score, sample ``i`` uses ``prompts[i % len(prompts)]``; default for class
            conditional models: ``prompt_template`` filled with the reference's class names.
        cond_fn: custom conditioning ``indices -> Conditioning``; overrides classes and prompts.
        prompt_encoder: a text-to-image model's text encoder (``encode(list[str]) -> Conditioning``): sample ``i``
            is conditioned on the caption CLIP score pairs it with (``prompts``, see :meth:`prompts_for`).
        latent: a latent model's VAE (``LatentCodec``): samples are decoded to images before any extractor.
            In-loop, :meth:`attach` takes both (and the run's captions) from the teacher and the data.
        kid_subsets / kid_subset_size: clean-fid KID subsets (100 x 1000, its defaults).
        pr_k: k of the precision/recall k-NN manifolds (3, the paper's).
        device: where generation and feature extraction run (``None``: the device of the first model scored,
            so an in-loop evaluator follows the trainer onto the GPU).
        results_path: if set, every call appends a row (step, scores) to this results JSON (in-loop use).
        cache: cache reference statistics in ``cache_dir()/refstats``.
    """

    def __init__(
        self,
        extractor: str | FeatureExtractor = "effnet_lite0",
        reference: Any = None,
        num_images: int = 1000,
        metrics: Sequence[str] = ("fid", "kid"),
        seed: int = 0,
        batch_size: int = 64,
        extractor_kwargs: dict[str, Any] | None = None,
        num_reference: int | None = None,
        reference_split: str | None = None,
        reference_seed: int = 0,
        sampler_steps: int | None = None,
        sigmas: Sequence[float] | None = None,
        num_classes: int | str | None = "auto",
        clip: str | CLIP | None = None,
        clip_kwargs: dict[str, Any] | None = None,
        prompts: Sequence[str] | None = None,
        prompt_template: str = "a photo of a {}.",
        cond_fn: CondFn | None = None,
        prompt_encoder: Any = None,
        latent: Any = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        pr_k: int = 3,
        device: str | torch.device | None = None,
        cache: bool = True,
        verbose: bool = False,
        results_path: str | None = None,
    ):
        expanded: list[str] = []
        for m in metrics:
            expanded += ["precision", "recall"] if m == "precision_recall" else [m]
        metrics = expanded
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; available: {', '.join(METRICS)}")
        if num_images < 2:
            raise ValueError(f"num_images must be >= 2, got {num_images}")
        self.metrics = list(dict.fromkeys(metrics))
        self.reference = _instantiate(reference)
        if self.reference is None and any(m != "clip_score" for m in self.metrics):
            raise ValueError(f"metrics {self.metrics} need a reference dataset")
        if "kid" in self.metrics and min(num_images, num_reference or num_images) < 2:
            raise ValueError("KID needs at least 2 images on each side")
        self.device = torch.device(device) if device is not None else None
        self.results_path = results_path
        self.extractor_spec, self.extractor_kwargs = extractor, dict(extractor_kwargs or {})
        self.clip_spec, self.clip_kwargs = clip, dict(clip_kwargs or {})
        if any(m in self.metrics for m in ("clip_score", "clip_fid")) and clip is None:
            raise ValueError("clip_score / clip_fid need `clip` (a clip_<arch> extractor id and its checkpoint)")
        self.num_images, self.seed, self.batch_size = int(num_images), int(seed), int(batch_size)
        self.num_reference, self.reference_split, self.reference_seed = num_reference, reference_split, reference_seed
        self.sampler_steps = sampler_steps
        self.sigmas = None if sigmas is None else [float(s) for s in sigmas]
        self.num_classes = num_classes
        self.prompts = list(prompts) if prompts else None
        self.prompt_template, self.cond_fn = prompt_template, cond_fn
        self.prompt_encoder, self.latent = prompt_encoder, latent
        self.kid_subsets, self.kid_subset_size, self.pr_k = kid_subsets, kid_subset_size, pr_k
        self.cache, self.verbose = cache, verbose
        self._extractor: FeatureExtractor | None = None
        self._clip: CLIP | None = None
        self._ref: dict[str, ReferenceStats] = {}
        self.last_sampler: dict[str, Any] | None = None
        self.last_seconds: float | None = None

    # -------------------------------------------------------------------------------------------- parts
    @property
    def extractor(self) -> FeatureExtractor | None:
        """The main extractor (built on first use); ``None`` when only ``clip_score`` is asked for."""
        if self._extractor is None and any(m in self.metrics for m in ("fid", "kid", "precision", "recall")):
            self._extractor = build_extractor(self.extractor_spec, self.device or "cpu", **self.extractor_kwargs)
        return self._extractor

    @property
    def clip(self) -> CLIP | None:
        if self._clip is None and self.clip_spec is not None:
            self._clip = build_extractor(self.clip_spec, self.device or "cpu", **self.clip_kwargs)
            if not isinstance(self._clip, CLIP):
                raise ValueError(f"`clip` must be a clip_<arch> extractor, got '{self._clip.id}'")
        return self._clip

    def reference_stats(self, extractor: FeatureExtractor) -> ReferenceStats:
        """Reference statistics for ``extractor`` (computed once, cached on disk)."""
        if extractor.id not in self._ref:
            self._ref[extractor.id] = reference_stats(
                self.reference,
                extractor,
                self.num_reference,
                self.reference_split,
                self.batch_size,
                self.cache,
                seed=self.reference_seed,
                verbose=self.verbose,
            )
        return self._ref[extractor.id]

    def _num_classes(self, model: nn.Module | None) -> int | None:
        if self.num_classes == "auto":
            return getattr(model, "num_classes", None) if model is not None else None
        return self.num_classes

    def prompts_for(self, n: int, num_classes: int | None = None) -> list[str]:
        """Caption of each generated sample for CLIP score."""
        if self.prompts:
            return [self.prompts[i % len(self.prompts)] for i in range(n)]
        names = getattr(self.reference, "class_names", None)
        if num_classes and names:
            return [self.prompt_template.format(names[i % num_classes]) for i in range(n)]
        raise ValueError(
            "clip_score and text-to-image generation need `prompts` (captions; in-loop: data with captions), or a "
            "class-conditional model and a reference with class_names"
        )

    def attach(self, teacher: nn.Module | None = None, dataset: Any = None) -> None:
        """Take what a latent text-to-image run needs from its teacher (text encoder, VAE) and data (captions, when
        no ``prompts`` were given); what was set explicitly is kept. The trainer calls it for in-loop evaluation."""
        if teacher is not None:
            if self.prompt_encoder is None:
                self.prompt_encoder = getattr(teacher, "prompt_encoder", None)
            if self.latent is None:
                self.latent = getattr(teacher, "latent", None)
        if self.prompt_encoder is not None and not self.prompts and dataset is not None:
            from diffdistill.data.prompts import dataset_prompts

            self.prompts = dataset_prompts(dataset) or None

    # -------------------------------------------------------------------------------------------- scoring
    def generate(self, model: nn.Module) -> torch.Tensor:
        """The ``num_images`` uint8 samples this evaluator scores."""
        if self.device is None:
            p = next(model.parameters(), None)
            p = next(model.buffers(), None) if p is None else p
            self.device = p.device if p is not None else torch.device("cpu")
        spec = sampler_spec(model, self.sampler_steps, self.sigmas)
        nc = self._num_classes(model)
        cond_fn = self.cond_fn
        if cond_fn is None and self.prompt_encoder is not None:  # image i: the caption CLIP score pairs it with
            cond_fn = prompt_conditioning(self.prompts_for(self.num_images, nc), self.prompt_encoder)
        elif cond_fn is None and nc:
            cond_fn = class_conditioning(nc)
        self.last_sampler = {
            **spec.protocol(),
            "num_classes": nc,
            "guidance_scale": getattr(model, "guidance_scale", None),
            "prompts": self.prompt_encoder is not None,
            "latent_decoded": self.latent is not None,
        }
        # each process generates its share of the per-sample seeds; the gathered set is the same for any number of
        # processes, since image i depends only on (model, seed + i)
        from diffdistill.utils.distributed import gather_cat, shard

        start, stop = shard(self.num_images)
        decode = self.latent.decode if self.latent is not None else None
        mine = list(
            iter_generate(model, stop - start, self.seed, self.batch_size, start, spec, cond_fn, self.device, decode)
        )
        return gather_cat(torch.cat(mine) if mine else torch.empty(0, dtype=torch.uint8))

    def score_images(self, images: torch.Tensor, num_classes: int | None = None) -> dict[str, float]:
        """Score uint8 images ``[N, C, H, W]`` (the i-th image is taken as sample index i)."""
        out: dict[str, float] = {}
        if self.extractor is not None:
            feats = self.extractor.extract(images, self.batch_size)
            ref = self.reference_stats(self.extractor)
            if "fid" in self.metrics:
                out["fid"] = M.frechet_distance(*M.feature_stats(feats), ref.mu, ref.sigma)
            if "kid" in self.metrics:
                out["kid"] = M.kid(feats, ref.features, self.kid_subsets, self.kid_subset_size, seed=self.seed)
            if "precision" in self.metrics or "recall" in self.metrics:
                pr = M.precision_recall(ref.features, feats, self.pr_k)
                out.update({k: v for k, v in pr.items() if k in self.metrics})
        if "clip_score" in self.metrics or "clip_fid" in self.metrics:
            clip = self.clip
            emb = torch.from_numpy(clip.extract(images, self.batch_size))
            if "clip_fid" in self.metrics:
                ref = self.reference_stats(clip)
                out["clip_fid"] = M.frechet_distance(*M.feature_stats(emb.numpy()), ref.mu, ref.sigma)
            if "clip_score" in self.metrics:
                text = clip.encode_texts(self.prompts_for(images.shape[0], num_classes))
                out.update(M.clip_score(emb, text))
        return out

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int | None = None) -> dict[str, float]:
        """Generate and score; ``step`` is only recorded (see :meth:`record`)."""
        t0 = time.perf_counter()
        images = self.generate(model)
        out = self.score_images(images, self._num_classes(model))
        self.last_seconds = time.perf_counter() - t0
        from diffdistill.utils.distributed import is_main_process

        if self.results_path and is_main_process():
            write_results(self.results_path, self.protocol(), [self.record(out, step=step, kind="in-loop")])
        if self.verbose:
            print(f"[eval] step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in out.items()))
        return out

    # -------------------------------------------------------------------------------------------- protocol
    def protocol(self) -> dict[str, Any]:
        """Everything needed to reproduce a number: extractor, weights hash, images, seeds, reference, sampler."""
        p: dict[str, Any] = {
            "metrics": self.metrics,
            "num_images": self.num_images,
            "seed_range": [self.seed, self.seed + self.num_images - 1],
            "seeding": "sample i: torch.Generator().manual_seed(seed + i)",
            "image_quantisation": "uint8 (round)",
            "kid": {"num_subsets": self.kid_subsets, "max_subset_size": self.kid_subset_size, "numpy_seed": self.seed},
            "precision_recall_k": self.pr_k,
            "sampler": self.last_sampler,
        }
        if self.extractor is not None:
            p["extractor"] = self.extractor.protocol()
        if self.clip is not None:
            p["clip"] = self.clip.protocol()
            if "clip_score" in self.metrics:
                p["clip_score_prompts"] = (
                    self.prompts[:20] if self.prompts else f"class names via '{self.prompt_template}'"
                )
        if self.reference is not None:
            ref_meta = {}
            for ex in (self.extractor, self.clip):
                if ex is not None and ex.id in self._ref:
                    r = self._ref[ex.id]
                    ref_meta[ex.id] = {
                        "num_images": r.num_images,
                        "cache_file": str(r.path) if r.path else None,
                        "subset_seed": r.meta.get("subset_seed"),
                    }
            p["reference"] = {**describe_dataset(self.reference, self.reference_split), "stats": ref_meta}
        p["software"] = {
            "diffdistill": _version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        }
        return p

    def record(
        self,
        scores: dict[str, float],
        step: int | None = None,
        checkpoint: str | None = None,
        ema: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """One results row: step, checkpoint, EMA track, sampler, scores, wall time."""
        return {
            "step": step,
            "checkpoint": checkpoint,
            "ema": ema,
            "sampler_steps": (self.last_sampler or {}).get("sampler_steps"),
            **{k: float(v) for k, v in scores.items()},
            "seconds": self.last_seconds,
            **extra,
        }


def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("diffdistill")
    except Exception:  # noqa: BLE001 - not installed (plain checkout)
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_results(path: str | Path, protocol: dict[str, Any], rows: list[dict[str, Any]], append: bool = True) -> Path:
    """Write ``{"format", "created", "protocol", "results": rows}`` atomically.

    With ``append`` an existing file with the same protocol keeps its rows; rows with the same
    ``(checkpoint, ema, step, sampler_steps)`` are replaced. A different protocol raises (never mix protocols).
    """
    path = Path(path)
    old_rows: list[dict[str, Any]] = []
    if append and path.is_file():
        old = json.loads(path.read_text())
        if _comparable(old.get("protocol", {})) != _comparable(protocol):
            raise ValueError(f"'{path}' holds results of a different evaluation protocol; write to another file")
        old_rows = old.get("results", [])
    key = lambda r: (r.get("checkpoint"), r.get("ema"), r.get("step"), r.get("sampler_steps"))  # noqa: E731
    new_keys = {key(r) for r in rows}
    merged = [r for r in old_rows if key(r) not in new_keys] + list(rows)
    merged.sort(key=lambda r: (r.get("step") is None, r.get("step") or 0))
    doc = {"format": RESULTS_FORMAT, "created": _now(), "protocol": protocol, "results": merged}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path)
    return path


def _comparable(p: dict[str, Any]) -> dict[str, Any]:
    """The parts of a protocol that must match for two results to share a file."""
    ex = p.get("extractor") or {}
    return {
        "metrics": p.get("metrics"),
        "num_images": p.get("num_images"),
        "seed_range": p.get("seed_range"),
        "extractor": ex.get("extractor"),
        "weights_sha256": ex.get("weights_sha256"),
        "reference": {k: (p.get("reference") or {}).get(k) for k in ("dataset", "split", "resolution")},
    }


def read_results(path: str | Path) -> dict[str, Any]:
    """Load a results JSON written by :func:`write_results`."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != RESULTS_FORMAT:
        raise ValueError(f"'{path}' is not a diffdistill evaluation results file")
    return doc
