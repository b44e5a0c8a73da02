"""Benchmark workloads of `guidance_attention`: our backends against the eager reference, torch.compile of
it, F.scaled_dot_product_attention with the same boolean mask, and (on CUDA) FlexAttention with the same
band + global block mask. K and V of the baselines are the local keys followed by the global tokens.
TFLOP/s count the allowed (query, key) pairs only: 4 * B * H * Dh * sum_i (band_i + G) for the forward
(two matmuls), 3.5 times that for forward + backward (the backward's five matmuls against the forward's
two, as flash-attention counts; recomputation is not counted)."""

import torch
import torch.nn.functional as F

import python_ref
from python_ref.guidance_attention import band_mask

from .. import backends
from ..ops.guidance_attention import guidance_attention
from ._harness import COMPILE, EAGER, FORWARD, FORWARD_BACKWARD, BenchCase

# (batch, heads, length, window); Dh and G are fixed.
SHAPES = {
    "cpu": [(1, 4, 1024, 64), (1, 4, 1024, 256)],
    # L8192 w128 is the goal shape (against FlexAttention and SDPA).
    "cuda": [(2, 8, 1024, 64), (2, 8, 4096, 256), (2, 8, 8192, 128), (2, 8, 16384, 64), (2, 8, 16384, 256)],
}
DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16]}
HEAD_DIM = 64
GLOBAL_TOKENS = 16
# The dense reference materialises (B, H, L, L + G) scores in fp32 several times over; beyond this length
# it would not fit a GPU, so eager and compile are left out there (the other contenders still run).
MAX_DENSE_LENGTH = {"cpu": 4096, "cuda": 4096}


def allowed_pairs(len_q, len_k, window, globals_):
    """The number of (query, key) pairs the op computes: sum over queries of the band size plus G."""
    centre = ((2 * torch.arange(len_q, dtype=torch.int64) + 1) * len_k) // (2 * len_q)
    if window < 0:
        band = torch.full_like(centre, len_k)
    else:
        band = (centre + window).clamp(max=len_k - 1) - (centre - window).clamp(min=0) + 1
    return int(band.sum()) + len_q * globals_


def _inputs(batch, heads, length, device, dtype):
    def make():
        def t(tokens):
            return torch.randn(batch, heads, tokens, HEAD_DIM, device=device, dtype=dtype).requires_grad_()

        return {"q": t(length), "k": t(length), "v": t(length), "k_global": t(GLOBAL_TOKENS),
                "v_global": t(GLOBAL_TOKENS)}

    return make


def _sdpa(window, device):
    """SDPA over [k; k_global] with the op's mask as a boolean (Lq, Lk + G) tensor, built once."""
    masks = {}

    def run(q, k, v, k_global, v_global):
        len_q, len_k = q.shape[2], k.shape[2]
        key = (len_q, len_k)
        if key not in masks:
            band = band_mask(len_q, len_k, window, device=device)
            masks[key] = torch.cat([band, band.new_ones(len_q, k_global.shape[2])], dim=1)
        return F.scaled_dot_product_attention(q, torch.cat([k, k_global], 2), torch.cat([v, v_global], 2),
                                              attn_mask=masks[key])

    return run


def _flex(window, device):
    """FlexAttention over [k; k_global] with a block mask of the band plus the global columns; compiled,
    as FlexAttention is meant to run."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    block_masks = {}

    def run(q, k, v, k_global, v_global):
        len_q, len_k = q.shape[2], k.shape[2]
        key = (len_q, len_k)
        if key not in block_masks:
            def mask_mod(b, h, q_idx, kv_idx):
                centre = ((2 * q_idx + 1) * len_k) // (2 * len_q)
                return (kv_idx >= len_k) | ((kv_idx - centre).abs() <= window)

            block_masks[key] = create_block_mask(mask_mod, None, None, len_q, len_k + k_global.shape[2],
                                                 device=device)
        return compiled(q, torch.cat([k, k_global], 2), torch.cat([v, v_global], 2), block_mask=block_masks[key])

    return run


def cases(device, shapes=None):
    ours = [b for b in backends() if b in (("cpu",) if device == "cpu" else ("cuda", "triton"))]
    result = []
    for dtype in DTYPES[device]:
        for batch, heads, length, window in shapes or SHAPES[device]:
            def reference(window=window, **kw):
                return python_ref.guidance_attention(**kw, window=window)

            contenders = {}
            if length <= MAX_DENSE_LENGTH[device]:
                contenders[EAGER] = reference
                contenders[COMPILE] = torch.compile(reference)
            contenders["sdpa"] = _sdpa(window, device)
            if device == "cuda":
                contenders["flex"] = _flex(window, device)
            for backend in ours:
                contenders[backend] = (lambda backend=backend, window=window, **kw:
                                       guidance_attention(**kw, window=window, backend=backend))
            forward_flops = 4 * batch * heads * HEAD_DIM * allowed_pairs(length, length, window, GLOBAL_TOKENS)
            result.append(BenchCase(
                op="guidance_attention", label=f"B{batch} H{heads} L{length} w{window} G{GLOBAL_TOKENS} "
                                               f"Dh{HEAD_DIM}",
                device=device, dtype=dtype, make_inputs=_inputs(batch, heads, length, device, dtype),
                contenders=contenders,
                flops={FORWARD: forward_flops, FORWARD_BACKWARD: 3.5 * forward_flops},
            ))
    return result
