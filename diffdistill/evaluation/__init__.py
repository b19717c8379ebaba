"""Evaluation: per-sample-seeded generation, feature extractors by id, FID/KID/precision-recall/CLIP score,
cached reference statistics, the :class:`Evaluator` harness and results plots."""

from diffdistill.evaluation.extractors import (
    CLIP,
    EffNetLite0,
    FeatureExtractor,
    Inception,
    MissingWeightsError,
    RandomCNN,
    available_extractors,
    build_extractor,
)
from diffdistill.evaluation.generation import generate, iter_generate, per_sample_noise, sampler_spec
from diffdistill.evaluation.harness import METRICS, Evaluator, read_results, write_results
from diffdistill.evaluation.metrics import clip_score, fid, frechet_distance, kid, precision_recall
from diffdistill.evaluation.plot import plot_results
from diffdistill.evaluation.reference import ReferenceStats, folder_features, reference_stats, save_images

__all__ = [
    "CLIP",
    "METRICS",
    "EffNetLite0",
    "Evaluator",
    "FeatureExtractor",
    "Inception",
    "MissingWeightsError",
    "RandomCNN",
    "ReferenceStats",
    "available_extractors",
    "build_extractor",
    "clip_score",
    "fid",
    "folder_features",
    "frechet_distance",
    "generate",
    "iter_generate",
    "kid",
    "per_sample_noise",
    "plot_results",
    "precision_recall",
    "read_results",
    "reference_stats",
    "sampler_spec",
    "save_images",
    "write_results",
]
