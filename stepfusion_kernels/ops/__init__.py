"""The public ops, one file each: argument checks, fake kernels, autograd, backend choice."""

from .cohort_mutual_loss import cohort_mutual_loss
from .shift_expand import shift_expand

__all__ = ["cohort_mutual_loss", "shift_expand"]
