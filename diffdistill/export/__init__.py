"""Export a distilled student as a diffusers pipeline folder (``diffdistill-export``).

* :func:`export`: from a run folder, a checkpoint folder or a generator model folder;
* :func:`export_pipeline`: from a :class:`~diffdistill.models.generator.Generator` in memory;
* :class:`DiffDistillPipeline` / :class:`DiffDistillGeneratorModel`: diffdistill's own pipeline, for students the
  stock ``ConsistencyModelPipeline`` cannot express (see ``diffdistill/export/exporter.py``).

Only models, conventions and samplers are imported here (no objective or training code), so loading an exported
pipeline needs nothing beyond the student's own modules.
"""

from __future__ import annotations

from diffusers import ModelMixin

from diffdistill.export.pipeline import DiffDistillGeneratorModel, DiffDistillPipeline

# diffusers writes a component's ``__module__`` into ``model_index.json`` and imports it on load: the public path
# (not the file the class lives in) keeps exported folders loadable when files move. On load it also looks up the
# loadable base classes (``ModelMixin``) in that module (diffusers/pipelines/pipeline_loading_utils.py,
# ``get_class_obj_and_candidates``), hence the import above.
DiffDistillGeneratorModel.__module__ = __name__
DiffDistillPipeline.__module__ = __name__

from diffdistill.export.exporter import (  # noqa: E402 - after the module paths are set
    CMSchedule,
    ExportResult,
    choose_pipeline,
    cm_schedule,
    export,
    export_pipeline,
    fuse_lora,
    read_metadata,
    reference_sample,
)

__all__ = [
    "CMSchedule",
    "DiffDistillGeneratorModel",
    "DiffDistillPipeline",
    "ExportResult",
    "ModelMixin",
    "choose_pipeline",
    "cm_schedule",
    "export",
    "export_pipeline",
    "fuse_lora",
    "read_metadata",
    "reference_sample",
]
