"""Distillation objectives.

Importing this package imports every module in it, and each module registers its classes with
:func:`register_objective`: a new objective file is picked up by the CLI, the tests and the benchmarks
without editing any list. ``diffdistill.objectives.<ClassName>`` resolves every registered class.
"""

from __future__ import annotations

import importlib
import pkgutil

from diffdistill.objectives.base import (
    OBJECTIVES,
    LossOutput,
    Objective,
    Paper,
    PassCount,
    UpdateSchedule,
    register_objective,
)

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in ("base", "common"):
        importlib.import_module(f"{__name__}.{_module.name}")

globals().update({cls.__name__: cls for cls in OBJECTIVES.values()})

__all__ = [
    "OBJECTIVES",
    "LossOutput",
    "Objective",
    "Paper",
    "PassCount",
    "UpdateSchedule",
    "register_objective",
    *sorted(cls.__name__ for cls in OBJECTIVES.values()),
]
