"""Drop-in nn.Modules around the ops."""

from .shift_expand import StepShiftExpand

__all__ = ["StepShiftExpand"]
