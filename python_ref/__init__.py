"""Pure-PyTorch references of every op, literal to ../shared/SPEC.md: the oracle of the tests and the
baseline of the benchmarks. No speed tricks."""

from .cohort_mutual_loss import cohort_mutual_loss
from .guidance_attention import guidance_attention
from .shift_expand import shift_expand
from .skew_pair_project import skew_pair_project

__all__ = ["cohort_mutual_loss", "guidance_attention", "shift_expand", "skew_pair_project"]
