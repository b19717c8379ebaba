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
from diffdistill.objectives.consistency import ConsistencyDistillation
from diffdistill.objectives.dmd import DMD
from diffdistill.objectives.ect import ECT, ICT
from diffdistill.objectives.lcm import LCM
from diffdistill.objectives.rcm import RCM
from diffdistill.objectives.scm import SCM

__all__ = [
    "DMD",
    "ECT",
    "ICT",
    "LCM",
    "OBJECTIVES",
    "RCM",
    "SCM",
    "ConsistencyDistillation",
    "LossOutput",
    "Objective",
    "Paper",
    "PassCount",
    "UpdateSchedule",
    "register_objective",
]
