"""Pure-PyTorch references of every op, literal to ../shared/SPEC.md: the oracle of the tests and the
baseline of the benchmarks. No speed tricks."""

from .shift_expand import shift_expand
from .skew_pair_project import skew_pair_project

__all__ = ["shift_expand", "skew_pair_project"]
