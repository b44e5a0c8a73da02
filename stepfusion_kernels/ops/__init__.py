"""The public ops, one file each: argument checks, fake kernels, autograd, backend choice."""

from .guidance_attention import guidance_attention
from .shift_expand import shift_expand

__all__ = ["guidance_attention", "shift_expand"]
