"""stepfusion-kernels: Triton and C++/CUDA kernels for multimodal fusion.

Ops (each with `backend="auto" | "reference" | "cpu" | "cuda" | "triton"`):
    shift_expand         one fused shift-and-expand step of Step fusion (SPEC section 1)
    guidance_attention   cross-modal banded local + global guidance attention (SPEC section 2)
    skew_pair_project    sparse skew-pair projection of SSFN, one grouped GEMM (SPEC section 3);
                         its pair sets come from skew_pairs(skew, num_pairs, layers_a, layers_b)
    cohort_mutual_loss   Meta Fusion's mutual-learning penalty of a student cohort (SPEC section 4)
Modules: `stepfusion_kernels.nn`. Usable backends here: `stepfusion_kernels.backends()`.
"""

from . import nn, ops
from ._backend import BACKENDS, backends
from .ops import cohort_mutual_loss, guidance_attention, shift_expand, skew_pair_project, skew_pairs

__version__ = "0.1.0"
__all__ = ["BACKENDS", "backends", "cohort_mutual_loss", "guidance_attention", "nn", "ops", "shift_expand",
           "skew_pair_project", "skew_pairs"]
