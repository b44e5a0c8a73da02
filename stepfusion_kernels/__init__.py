"""stepfusion-kernels: Triton and C++/CUDA kernels for multimodal fusion.

Ops (each with `backend="auto" | "reference" | "cpu" | "cuda" | "triton"`):
    shift_expand   one fused shift-and-expand step of Step fusion (SPEC section 1)
    guidance_attention   cross-modal banded local + global guidance attention (SPEC section 2)
Modules: `stepfusion_kernels.nn`. Usable backends here: `stepfusion_kernels.backends()`.
"""

from . import nn, ops
from ._backend import BACKENDS, backends
from .ops import guidance_attention, shift_expand

__version__ = "0.1.0"
__all__ = ["BACKENDS", "backends", "guidance_attention", "nn", "ops", "shift_expand"]
