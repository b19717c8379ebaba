"""Distillation objectives; importing this package registers every objective in :data:`OBJECTIVES`."""

from diffdistill.objectives.base import (
    OBJECTIVES,
    LossOutput,
    Objective,
    Paper,
    PassCount,
    UpdateSchedule,
    register_objective,
)
from diffdistill.objectives.dmd import DMD

__all__ = ["DMD", "OBJECTIVES", "LossOutput", "Objective", "Paper", "PassCount", "UpdateSchedule",
           "register_objective"]
