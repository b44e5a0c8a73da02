"""The public ops, one file each: argument checks, fake kernels, autograd, backend choice."""

from .cohort_mutual_loss import cohort_mutual_loss
from .guidance_attention import guidance_attention
from .shift_expand import shift_expand
from .skew_pair_project import skew_pair_project, skew_pairs

__all__ = ["cohort_mutual_loss", "guidance_attention", "shift_expand", "skew_pair_project", "skew_pairs"]
