"""Helpers shared by the Triton kernels: launch settings from the shape, and fp32 math."""

import triton
import triton.language as tl

from .._backend import triton_interpreted

MAX_FUSED_BLOCK = 65536  # widest row kept in registers by one program


def row_block(dim, op):
    """The power-of-two block that holds a whole row of `dim` channels, and the warps to run it."""
    block = triton.next_power_of_2(max(dim, 1))
    if block > MAX_FUSED_BLOCK:
        raise ValueError(f"{op} (triton backend): D must be at most {MAX_FUSED_BLOCK}, got {dim}")
    num_warps = 1 if triton_interpreted() else min(max(block // 256, 1), 16)
    return block, num_warps


@triton.jit
def tanh(z):
    # 2 * sigmoid(2z) - 1 saturates cleanly at +-1 for large |z| (no inf / inf).
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0
