"""Triton kernels of `guidance_attention`, flash-attention-2 style.

Forward: one program per (query block, batch * head); online softmax (base-2 exponentials) over the
key blocks that intersect the band of the block, then over the global tokens as extra key blocks;
saves the row logsumexp (natural log). Backward: delta = rowsum(dO * O) first; one kernel per key
block for dk and dv that loops over the query blocks whose band reaches the block; one kernel per query
block for dq that also writes its block's share of the global-token gradients, summed afterwards in
a fixed order (no atomics). Band limits come from c_i = ((2 i + 1) Lk) // (2 Lq) and its closed-form
inverse, so out-of-band blocks are never loaded."""

import functools

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted

LOG2E_HOST = 1.4426950408889634  # log2(e), for the softmax scale passed to the kernels
LOG2E = tl.constexpr(LOG2E_HOST)  # the kernels' own copies: a Triton kernel reads only constexpr globals
LN2 = tl.constexpr(0.6931471805599453)


# float32 dot products run in IEEE precision on the FMA units, operands and products in registers: compiled
# for sm_90, 64 x 64 tiles spill up to 23 KB per thread (1.3-9 KB at Dh 64). These tiles spill nothing (16
# bytes in one kernel at Dh 128; scripts/compile_triton.py). Not yet timed against 64 x 64 on a GPU.
FP32_BLOCKS = {16: (16, 64), 32: (16, 64), 64: (16, 64), 128: (16, 16)}
# Compute capability 8.x (A100, Ampere and Ada cards) has no warpgroup MMA, and its tiles keep more in
# registers. Where the tiles above spill over 512 bytes per thread compiled for sm_80, these take their place:
# 16-bit at Dh 64 (3.6 KB in the banded dk/dv kernel; 1.3 KB on sm_89) and Dh 128 (600 bytes in dq; 80 with
# 64 x 32) and float32 at Dh 64 (744 bytes in dq; none with 16 x 32). Keyed by (float32, head_dim). Not
# timed: no such GPU at hand.
SM8X_BLOCKS = {(False, 64): (64, 32), (False, 128): (64, 32), (True, 64): (16, 32)}


def _blocks(dtype, head_dim, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): small tiles under the interpreter, where they keep
    several blocks (and the band skipping) in play on test-sized inputs; on a GPU, 64 x 64 tensor-core tiles
    for 16-bit inputs and FP32_BLOCKS for float32, except where SM8X_BLOCKS has other tiles for the GPU."""
    if triton_interpreted():
        return 16, 16, 1, 1
    float32 = dtype == torch.float32
    blocks = FP32_BLOCKS[head_dim] if float32 else (64, 64)
    if _compute_capability(device)[0] == 8:
        blocks = SM8X_BLOCKS.get((float32, head_dim), blocks)
    return *blocks, 4, 2


@functools.lru_cache(maxsize=None)
def _compute_capability(device):
    return torch.cuda.get_device_capability(device)  # once per device: it is on every call's path


@triton.jit
def _centre(i, len_q, len_k):
    # 64-bit: (2 i + 1) Lk passes 2^31 from L = 32768 on.
    return ((2 * i.to(tl.int64) + 1) * len_k) // (2 * len_q)


@triton.jit
def _key_span(q_begin, q_end, len_q, len_k, window, BANDED: tl.constexpr, BLOCK_N: tl.constexpr):
    """[first, end) of the key blocks (aligned to BLOCK_N) that the queries [q_begin, q_end) reach."""
    if BANDED:
        first = tl.maximum(_centre(q_begin, len_q, len_k) - window, 0)
        end = tl.minimum(_centre(q_end - 1, len_q, len_k) + window + 1, len_k)
        first = (first // BLOCK_N) * BLOCK_N
    else:
        first = 0
        end = len_k
    return first, end


@triton.jit
def _query_span(k_begin, k_end, len_q, len_k, window, BANDED: tl.constexpr, BLOCK_M: tl.constexpr):
    """[first, end) of the query blocks (aligned to BLOCK_M) whose band reaches the keys [k_begin, k_end).
    Inverse of the band, from floor(x / n) >= a <=> x >= a n (see csrc/guidance_attention.h)."""
    if BANDED:
        lower = 2 * len_q * (k_begin.to(tl.int64) - window)
        first = tl.where(lower <= 0, 0, ((lower + len_k - 1) // len_k) // 2)
        upper = (2 * len_q * (k_end.to(tl.int64) + window) - 1) // len_k
        end = tl.minimum(tl.where(upper >= 1, (upper - 1) // 2 + 1, 0), len_q)
        first = (first // BLOCK_M) * BLOCK_M
    else:
        first = 0
        end = len_q
    return first, end


@triton.jit
def _band(rows, cols, len_q, len_k, window, BANDED: tl.constexpr):
    """(rows x cols) mask of the allowed (query, key) pairs inside the bounds."""
    inside = (rows[:, None] < len_q) & (cols[None, :] < len_k)
    if BANDED:
        offset = cols[None, :] - _centre(rows, len_q, len_k)[:, None]
        inside = inside & (offset <= window) & (offset >= -window)
    return inside


@triton.jit
def _fold(q, key, value, allowed, row_max, row_sum, acc, qk_scale, DOT_DTYPE: tl.constexpr,
          PRECISION: tl.constexpr):
    """Folds one block of keys into the running softmax of a query block (base-2 scores)."""
    scores = tl.dot(q, tl.trans(key), input_precision=PRECISION) * qk_scale
    scores = tl.where(allowed, scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    # A row with no allowed key yet keeps max = -inf; subtract 0 there so that exp2 sees -inf, not NaN.
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp2(scores - safe_max[:, None])
    correction = tl.exp2(row_max - safe_max)
    row_sum = row_sum * correction + tl.sum(p, 1)
    acc = acc * correction[:, None] + tl.dot(p.to(DOT_DTYPE), value, input_precision=PRECISION)
    return new_max, row_sum, acc


@triton.jit
def _tile(begin, length, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows [begin, begin + BLOCK) of a (length x HEAD_DIM) row-major matrix: their indices, which of them
    exist, and the offsets of their elements (64-bit: length x HEAD_DIM may pass 2^31)."""
    index = begin + tl.arange(0, BLOCK)
    offsets = index[:, None].to(tl.int64) * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    return index, index < length, offsets


@triton.jit
def _load(ptr, offsets, ok, DOT_DTYPE: tl.constexpr):
    """The rows at `offsets`, zeros where not `ok`, as operands of the dot products."""
    return tl.load(ptr + offsets, mask=ok[:, None], other=0.0).to(DOT_DTYPE)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, kg_ptr, vg_ptr, out_ptr, lse_ptr, len_q, len_k, globals_, window,
                    qk_scale, BANDED: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    block_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    q_ptr += bh * len_q * HEAD_DIM  # this program's (batch, head) slices
    out_ptr += bh * len_q * HEAD_DIM
    lse_ptr += bh * len_q
    k_ptr += bh * len_k * HEAD_DIM
    v_ptr += bh * len_k * HEAD_DIM
    kg_ptr += bh * globals_ * HEAD_DIM
    vg_ptr += bh * globals_ * HEAD_DIM
    q_begin = block_m * BLOCK_M
    rows, row_ok, row_offsets = _tile(q_begin, len_q, BLOCK_M, HEAD_DIM)
    q = _load(q_ptr, row_offsets, row_ok, DOT_DTYPE)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    first, end = _key_span(q_begin, tl.minimum(q_begin + BLOCK_M, len_q), len_q, len_k, window, BANDED, BLOCK_N)
    for k_begin in range(first, end, BLOCK_N):
        cols, col_ok, offsets = _tile(k_begin, len_k, BLOCK_N, HEAD_DIM)
        key = _load(k_ptr, offsets, col_ok, DOT_DTYPE)
        value = _load(v_ptr, offsets, col_ok, DOT_DTYPE)
        row_max, row_sum, acc = _fold(q, key, value, _band(rows, cols, len_q, len_k, window, BANDED), row_max,
                                      row_sum, acc, qk_scale, DOT_DTYPE, PRECISION)

    for g_begin in range(0, globals_, BLOCK_N):
        tokens, token_ok, offsets = _tile(g_begin, globals_, BLOCK_N, HEAD_DIM)
        key = _load(kg_ptr, offsets, token_ok, DOT_DTYPE)
        value = _load(vg_ptr, offsets, token_ok, DOT_DTYPE)
        row_max, row_sum, acc = _fold(q, key, value, token_ok[None, :], row_max, row_sum, acc, qk_scale,
                                      DOT_DTYPE, PRECISION)

    # Rows past Lq never see a key; a sum of 1 there keeps them finite (they are not stored).
    row_sum = tl.where(row_sum > 0, row_sum, 1.0)
    tl.store(out_ptr + row_offsets, (acc / row_sum[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + rows, (row_max + tl.log2(row_sum)) * LN2, mask=row_ok)


@triton.jit
def _backward_key_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, len_q, len_k, window,
                         scale, qk_scale, BANDED: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """dk and dv of one key block, over the query blocks whose band reaches it. Scores are kept
    transposed (keys x queries) so that both products accumulate into (keys x Dh) tiles."""
    block_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    q_ptr += bh * len_q * HEAD_DIM  # this program's (batch, head) slices
    dout_ptr += bh * len_q * HEAD_DIM
    lse_ptr += bh * len_q
    delta_ptr += bh * len_q
    k_ptr += bh * len_k * HEAD_DIM
    v_ptr += bh * len_k * HEAD_DIM
    dk_ptr += bh * len_k * HEAD_DIM
    dv_ptr += bh * len_k * HEAD_DIM
    k_begin = block_n * BLOCK_N
    cols, col_ok, key_offsets = _tile(k_begin, len_k, BLOCK_N, HEAD_DIM)
    key = _load(k_ptr, key_offsets, col_ok, DOT_DTYPE)
    value = _load(v_ptr, key_offsets, col_ok, DOT_DTYPE)
    grad_key = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    grad_value = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    first, end = _query_span(k_begin, tl.minimum(k_begin + BLOCK_N, len_k), len_q, len_k, window, BANDED, BLOCK_M)
    for q_begin in range(first, end, BLOCK_M):
        rows, row_ok, row_offsets = _tile(q_begin, len_q, BLOCK_M, HEAD_DIM)
        q = _load(q_ptr, row_offsets, row_ok, DOT_DTYPE)
        dout = _load(dout_ptr, row_offsets, row_ok, DOT_DTYPE)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        scores_t = tl.dot(key, tl.trans(q), input_precision=PRECISION) * qk_scale
        allowed_t = col_ok[:, None] & row_ok[None, :]
        if BANDED:
            offset = cols[:, None] - _centre(rows, len_q, len_k)[None, :]
            allowed_t = allowed_t & (offset <= window) & (offset >= -window)
        p_t = tl.where(allowed_t, tl.exp2(scores_t - lse[None, :]), 0.0)
        grad_value += tl.dot(p_t.to(DOT_DTYPE), dout, input_precision=PRECISION)
        dp_t = tl.dot(value, tl.trans(dout), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        grad_key += tl.dot(ds_t.to(DOT_DTYPE), q, input_precision=PRECISION)

    tl.store(dk_ptr + key_offsets, (grad_key * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + key_offsets, grad_value.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _backward_query_kernel(q_ptr, k_ptr, v_ptr, kg_ptr, vg_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, partial_ptr,
                           len_q, len_k, globals_, window, scale, qk_scale, BANDED: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """dq of one query block, and the block's share of the global-token gradients, written to
    partial[bh, block, 0 (dk_global) or 1 (dv_global), g, :]."""
    block_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    q_ptr += bh * len_q * HEAD_DIM  # this program's (batch, head) slices
    dout_ptr += bh * len_q * HEAD_DIM
    dq_ptr += bh * len_q * HEAD_DIM
    lse_ptr += bh * len_q
    delta_ptr += bh * len_q
    k_ptr += bh * len_k * HEAD_DIM
    v_ptr += bh * len_k * HEAD_DIM
    kg_ptr += bh * globals_ * HEAD_DIM
    vg_ptr += bh * globals_ * HEAD_DIM
    partial_ptr += (bh * tl.num_programs(0) + block_m) * 2 * globals_ * HEAD_DIM
    q_begin = block_m * BLOCK_M
    rows, row_ok, row_offsets = _tile(q_begin, len_q, BLOCK_M, HEAD_DIM)
    q = _load(q_ptr, row_offsets, row_ok, DOT_DTYPE)
    dout = _load(dout_ptr, row_offsets, row_ok, DOT_DTYPE)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
    grad_q = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    first, end = _key_span(q_begin, tl.minimum(q_begin + BLOCK_M, len_q), len_q, len_k, window, BANDED, BLOCK_N)
    for k_begin in range(first, end, BLOCK_N):
        cols, col_ok, offsets = _tile(k_begin, len_k, BLOCK_N, HEAD_DIM)
        key = _load(k_ptr, offsets, col_ok, DOT_DTYPE)
        value = _load(v_ptr, offsets, col_ok, DOT_DTYPE)
        scores = tl.dot(q, tl.trans(key), input_precision=PRECISION) * qk_scale
        allowed = _band(rows, cols, len_q, len_k, window, BANDED)
        p = tl.where(allowed, tl.exp2(scores - lse[:, None]), 0.0)
        ds = p * (tl.dot(dout, tl.trans(value), input_precision=PRECISION) - delta[:, None])
        grad_q += tl.dot(ds.to(DOT_DTYPE), key, input_precision=PRECISION)

    for g_begin in range(0, globals_, BLOCK_N):
        tokens, token_ok, offsets = _tile(g_begin, globals_, BLOCK_N, HEAD_DIM)
        key = _load(kg_ptr, offsets, token_ok, DOT_DTYPE)
        value = _load(vg_ptr, offsets, token_ok, DOT_DTYPE)
        scores = tl.dot(q, tl.trans(key), input_precision=PRECISION) * qk_scale
        p = tl.where(row_ok[:, None] & token_ok[None, :], tl.exp2(scores - lse[:, None]), 0.0)
        ds = p * (tl.dot(dout, tl.trans(value), input_precision=PRECISION) - delta[:, None])
        grad_q += tl.dot(ds.to(DOT_DTYPE), key, input_precision=PRECISION)
        grad_key = tl.dot(tl.trans(ds.to(DOT_DTYPE)), q, input_precision=PRECISION) * scale
        grad_value = tl.dot(tl.trans(p.to(DOT_DTYPE)), dout, input_precision=PRECISION)
        tl.store(partial_ptr + offsets, grad_key, mask=token_ok[:, None])
        tl.store(partial_ptr + globals_ * HEAD_DIM + offsets, grad_value, mask=token_ok[:, None])

    tl.store(dq_ptr + row_offsets, (grad_q * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


HEAD_DIMS = (16, 32, 64, 128)


def _settings(q, window):
    """Launch constants shared by the kernels; fp32 dots in IEEE precision (no tf32) so that float32
    meets the 1e-4 bound, and fp32 operands under the interpreter, whose 16-bit dot is unreliable."""
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"guidance_attention (triton backend): head dim must be one of {HEAD_DIMS}, got {head_dim}")
    fp32_dot = q.dtype == torch.float32 or triton_interpreted()
    return dict(BANDED=window >= 0, DOT_DTYPE=tl.float32 if fp32_dot else (tl.bfloat16 if q.dtype == torch.bfloat16
                                                                                else tl.float16),
                PRECISION="ieee" if fp32_dot else "tf32", HEAD_DIM=head_dim)


def forward(q, k, v, k_global, v_global, window, scale):
    """Returns (out, lse): out like q (contiguous), lse (B, H, Lq) float32, natural log."""
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    globals_ = 0 if k_global is None else k_global.shape[2]
    k_global = k if k_global is None else k_global.contiguous()  # placeholder pointers when absent
    v_global = v if v_global is None else v_global.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, len_q), device=q.device, dtype=torch.float32)
    if batch * heads * len_q == 0:
        return out, lse
    settings = _settings(q, window)
    block_m, block_n, num_warps, num_stages = _blocks(q.dtype, q.shape[-1], q.device)
    _forward_kernel[(triton.cdiv(len_q, block_m), batch * heads)](
        q, k, v, k_global, v_global, out, lse, len_q, len_k, globals_, window, scale * LOG2E_HOST,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **settings)
    return out, lse


def backward(grad_out, q, k, v, k_global, v_global, out, lse, window, scale):
    """Gradients of (q, k, v, k_global, v_global); absent globals get fresh empty tensors."""
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out = grad_out.contiguous()
    has_globals = k_global is not None
    globals_ = k_global.shape[2] if has_globals else 0
    kg = k_global.contiguous() if has_globals else k
    vg = v_global.contiguous() if has_globals else v
    # The row term of the softmax backward: delta_i = dO_i . O_i = sum_j P_ij dP_ij.
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    grad_q = torch.empty_like(q)
    grad_k = torch.empty_like(k)  # every row is written, zeros where no query reaches it
    grad_v = torch.empty_like(v)
    block_m, block_n, num_warps, num_stages = _blocks(q.dtype, head_dim, q.device)
    query_blocks = triton.cdiv(len_q, block_m)
    partial = torch.zeros((batch * heads, query_blocks, 2, globals_, head_dim), device=q.device,
                          dtype=torch.float32)
    if batch * heads > 0:
        settings = _settings(q, window)
        launch = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **settings)
        if len_k > 0:
            _backward_key_kernel[(triton.cdiv(len_k, block_n), batch * heads)](
                q, k, v, grad_out, lse, delta, grad_k, grad_v, len_q, len_k, window, scale, scale * LOG2E_HOST,
                **launch)
        if len_q > 0:
            _backward_query_kernel[(query_blocks, batch * heads)](
                q, k, v, kg, vg, grad_out, lse, delta, grad_q, partial, len_q, len_k, globals_, window, scale,
                scale * LOG2E_HOST, **launch)
    if not has_globals:
        return grad_q, grad_k, grad_v, q.new_empty(0), q.new_empty(0)
    # Fixed-shape reduction of the query blocks' partials: deterministic, no atomics.
    sums = partial.sum(dim=1).view(batch, heads, 2, globals_, head_dim)
    return (grad_q, grad_k, grad_v, sums[:, :, 0].to(q.dtype, copy=True), sums[:, :, 1].to(q.dtype, copy=True))
