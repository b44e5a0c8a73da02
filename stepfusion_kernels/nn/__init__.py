"""Drop-in nn.Modules around the ops."""

from .shift_expand import StepShiftExpand
from .skew_pair_project import SkewPairProjection

__all__ = ["SkewPairProjection", "StepShiftExpand"]
