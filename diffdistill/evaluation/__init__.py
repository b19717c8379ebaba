"""Evaluation: per-sample-seeded generation, feature extractors by id, FID/KID/precision-recall/CLIP score,
cached reference statistics, the :class:`Evaluator` harness and results plots; for data with a known distribution
(toys) moment errors, sliced W2 and mode coverage against the truth."""

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
from diffdistill.evaluation.toy import (
    ToyReference,
    ToyResult,
    evaluate_toy,
    gaussian_moment_errors,
    has_known_distribution,
    mode_masses,
    sliced_w2,
    toy_reference,
)

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
    "ToyReference",
    "ToyResult",
    "available_extractors",
    "build_extractor",
    "clip_score",
    "evaluate_toy",
    "fid",
    "folder_features",
    "frechet_distance",
    "gaussian_moment_errors",
    "generate",
    "has_known_distribution",
    "iter_generate",
    "kid",
    "mode_masses",
    "per_sample_noise",
    "plot_results",
    "precision_recall",
    "read_results",
    "reference_stats",
    "sampler_spec",
    "save_images",
    "sliced_w2",
    "toy_reference",
    "write_results",
]
