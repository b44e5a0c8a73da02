"""Drop-in nn.Modules around the ops."""

from .cohort_mutual_loss import CohortMutualLoss
from .guidance_attention import GuidanceAttention
from .shift_expand import StepShiftExpand
from .skew_pair_project import SkewPairProjection

__all__ = ["CohortMutualLoss", "GuidanceAttention", "SkewPairProjection", "StepShiftExpand"]
