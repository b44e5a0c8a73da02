"""stepfusion-kernels: Triton and C++/CUDA kernels for multimodal fusion.

Ops (each with `backend="auto" | "reference" | "cpu" | "cuda" | "triton"`):
    shift_expand   one fused shift-and-expand step of Step fusion (SPEC section 1)
    cohort_mutual_loss   Meta Fusion's mutual-learning penalty of a student cohort (SPEC section 4)
Modules: `stepfusion_kernels.nn`. Usable backends here: `stepfusion_kernels.backends()`.
"""

from . import nn, ops
from ._backend import BACKENDS, backends
from .ops import cohort_mutual_loss, shift_expand

__version__ = "0.1.0"
__all__ = ["BACKENDS", "backends", "cohort_mutual_loss", "nn", "ops", "shift_expand"]
