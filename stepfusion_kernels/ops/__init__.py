"""The public ops, one file each: argument checks, fake kernels, autograd, backend choice."""

from .shift_expand import shift_expand
from .skew_pair_project import skew_pair_project, skew_pairs

__all__ = ["shift_expand", "skew_pair_project", "skew_pairs"]
