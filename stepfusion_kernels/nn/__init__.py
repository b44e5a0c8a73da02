"""Drop-in nn.Modules around the ops."""

from .cohort_mutual_loss import CohortMutualLoss
from .shift_expand import StepShiftExpand

__all__ = ["CohortMutualLoss", "StepShiftExpand"]
