"""Drop-in nn.Modules around the ops."""

from .guidance_attention import GuidanceAttention
from .shift_expand import StepShiftExpand

__all__ = ["GuidanceAttention", "StepShiftExpand"]
