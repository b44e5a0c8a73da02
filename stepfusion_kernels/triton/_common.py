"""Helpers shared by the Triton kernels: launch settings from the shape, and fp32 math."""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._backend import triton_interpreted

# The widest row that one program holds in registers whole. Compiled for sm_90 (scripts/compile_triton.py),
# the whole-row kernels of shift_expand and cohort_mutual_loss spill at most 1.1 KB per thread up to here (the
# backward at 8192) and several KB beyond (3-13 KB at 16384-65536); wider rows go to kernels that loop over the
# row in chunks of CHUNK, which spill nothing and take any width. Neither side has been timed at the switch.
FUSED_MAX = 8192
CHUNK = 1024


def row_block(dim):
    """(block, num_warps, whole_row): a power-of-two block holding the whole row of `dim` channels when
    dim <= FUSED_MAX (whole_row True), else one chunk of a row that the kernel loops over."""
    whole_row = dim <= FUSED_MAX
    if whole_row:
        block = triton.next_power_of_2(max(dim, 1))
        num_warps = min(max(block // 256, 1), 16)
    else:  # 4 channels per thread: the chunked shift_expand backward keeps more live than the whole-row one
        block = CHUNK
        num_warps = min(max(block // 128, 1), 16)
    if triton_interpreted():
        num_warps = 1
    return block, num_warps, whole_row


@triton.jit
def tanh(z):
    # 2 * sigmoid(2z) - 1 saturates cleanly at +-1 for large |z| (no inf / inf).
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


# exp to within 2 ulp. On a GPU, tl.exp of a float32 compiles to one approximate ex2 of x * log2(e), whose
# error grows with |x|; libdevice's expf reduces the range first (tl.log is libdevice's logf already). The
# interpreter cannot run libdevice, and its tl.exp is numpy's, already accurate.
@triton.jit
def _libdevice_exp(x):
    return libdevice.exp(x)


@triton.jit
def _interpreted_exp(x):
    return tl.exp(x)


accurate_exp = _interpreted_exp if triton_interpreted() else _libdevice_exp
