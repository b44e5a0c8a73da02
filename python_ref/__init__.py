"""Pure-PyTorch references of every op, literal to ../shared/SPEC.md: the oracle of the tests and the
baseline of the benchmarks. No speed tricks."""

from .cohort_mutual_loss import cohort_mutual_loss
from .shift_expand import shift_expand

__all__ = ["cohort_mutual_loss", "shift_expand"]
