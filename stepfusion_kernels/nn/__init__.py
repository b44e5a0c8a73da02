"""Drop-in nn.Modules around the ops."""

from .guidance_attention import GuidanceAttention
from .shift_expand import StepShiftExpand
from .skew_pair_project import SkewPairProjection

__all__ = ["GuidanceAttention", "SkewPairProjection", "StepShiftExpand"]
