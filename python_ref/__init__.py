"""Pure-PyTorch references of every op, literal to ../shared/SPEC.md: the oracle of the tests and the
baseline of the benchmarks. No speed tricks."""

from .guidance_attention import guidance_attention
from .shift_expand import shift_expand

__all__ = ["guidance_attention", "shift_expand"]
