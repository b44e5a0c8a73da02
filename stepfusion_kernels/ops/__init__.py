"""The public ops, one file each: argument checks, fake kernels, autograd, backend choice."""

from .shift_expand import shift_expand

__all__ = ["shift_expand"]
