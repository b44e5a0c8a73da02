"""Triton kernels of `shift_expand`: a one-pass forward (one program per row) and a backward whose
programs each own up to ROWS rows of one sample, writing per-program partial sums that a second,
deterministic pass (torch.sum, no atomics) reduces into the gate/weight/bias and global gradients.

Rows of up to FUSED_MAX channels stay in registers whole. Wider rows go to the `_wide` kernels, which loop
over a row in chunks and read it twice: the forward once for the statistics and once for y, the backward
once for each row's two sums (c1, c2) and once for the gradients."""

import torch
import triton
import triton.language as tl

from ._common import row_block, tanh

# Partial sums written by every backward program, in this order along the partial buffer's axis 1.
GATE, WEIGHT, BIAS, EXPAND_GLOBAL, SHIFT_GLOBAL = range(5)
MAX_ROWS_PER_PROGRAM = 32


@triton.jit
def _row_h(x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr, shift_global_ptr, gate_ptr,
           offs, global_offs, cols, mask,
           HAS_SCALE_LOCAL: tl.constexpr, HAS_SHIFT_LOCAL: tl.constexpr, HAS_SCALE_GLOBAL: tl.constexpr,
           HAS_SHIFT_GLOBAL: tl.constexpr, HAS_GATE: tl.constexpr):
    """x, s, u, h and tanh(scale_local) of one row in fp32; masked lanes hold zeros in h."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tanh_local = tl.zeros_like(x)
    if HAS_SCALE_LOCAL:
        tanh_local = tanh(tl.load(scale_local_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    s = 1.0 + tanh_local
    if HAS_SCALE_GLOBAL:
        s = s * (1.0 + tanh(tl.load(scale_global_ptr + global_offs, mask=mask, other=0.0).to(tl.float32)))
    t = tl.zeros_like(x)
    if HAS_SHIFT_LOCAL:
        t += tl.load(shift_local_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT_GLOBAL:
        t += tl.load(shift_global_ptr + global_offs, mask=mask, other=0.0).to(tl.float32)
    u = (s - 1.0) * x + t
    if HAS_GATE:
        h = x + tl.load(gate_ptr + cols, mask=mask, other=0.0).to(tl.float32) * u
    else:
        h = x + u
    return x, s, u, tl.where(mask, h, 0.0), tanh_local


@triton.jit
def _forward_kernel(x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr, shift_global_ptr, gate_ptr,
                    weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr, length, dim, eps,
                    HAS_SCALE_LOCAL: tl.constexpr, HAS_SHIFT_LOCAL: tl.constexpr, HAS_SCALE_GLOBAL: tl.constexpr,
                    HAS_SHIFT_GLOBAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    offs = row * dim + cols
    global_offs = (row // length) * dim + cols
    _, _, _, h, _ = _row_h(x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr, shift_global_ptr, gate_ptr,
                           offs, global_offs, cols, mask, HAS_SCALE_LOCAL, HAS_SHIFT_LOCAL, HAS_SCALE_GLOBAL,
                           HAS_SHIFT_GLOBAL, HAS_GATE)
    mean = tl.sum(h, axis=0) / dim
    centred = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / dim + eps)
    _store_y(y_ptr, weight_ptr, bias_ptr, offs, cols, mask, centred * rstd, HAS_WEIGHT, HAS_BIAS)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _wide_forward_kernel(x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr, shift_global_ptr, gate_ptr,
                         weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr, length, dim, eps,
                         HAS_SCALE_LOCAL: tl.constexpr, HAS_SHIFT_LOCAL: tl.constexpr,
                         HAS_SCALE_GLOBAL: tl.constexpr, HAS_SHIFT_GLOBAL: tl.constexpr, HAS_GATE: tl.constexpr,
                         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """_forward_kernel for rows wider than one block, chunk by chunk."""
    row = tl.program_id(0).to(tl.int64)
    sample = row // length
    # Pass 1: every chunk's own mean and sum of squared deviations (two-pass within the chunk, in registers),
    # merged into the row's by Chan et al.'s update, so no sum of squares of large values ever cancels.
    count = 0.0
    mean = 0.0
    squares = 0.0
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = cols < dim
        _, _, _, h, _ = _row_h(x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr, shift_global_ptr, gate_ptr,
                               row * dim + cols, sample * dim + cols, cols, mask, HAS_SCALE_LOCAL, HAS_SHIFT_LOCAL,
                               HAS_SCALE_GLOBAL, HAS_SHIFT_GLOBAL, HAS_GATE)
        chunk_count = tl.minimum(dim - start, BLOCK_D).to(tl.float32)
        chunk_mean = tl.sum(h, axis=0) / chunk_count
        centred = tl.where(mask, h - chunk_mean, 0.0)
        total = count + chunk_count
        delta = chunk_mean - mean
        mean += delta * (chunk_count / total)
        squares += tl.sum(centred * centred, axis=0) + delta * delta * (count * chunk_count / total)
        count = total
    rstd = 1.0 / tl.sqrt(squares / dim + eps)
    # Pass 2: y, with h recomputed (bit for bit: no fused multiply-adds, as in the backward).
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = cols < dim
        offs = row * dim + cols
        _, _, _, h, _ = _row_h(x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr, shift_global_ptr, gate_ptr,
                               offs, sample * dim + cols, cols, mask, HAS_SCALE_LOCAL, HAS_SHIFT_LOCAL,
                               HAS_SCALE_GLOBAL, HAS_SHIFT_GLOBAL, HAS_GATE)
        _store_y(y_ptr, weight_ptr, bias_ptr, offs, cols, mask, (h - mean) * rstd, HAS_WEIGHT, HAS_BIAS)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _store_y(y_ptr, weight_ptr, bias_ptr, offs, cols, mask, xhat, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = xhat
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_xhat(grad_y_ptr, offs, mask, h, mean, rstd, weight):
    grad_y = tl.load(grad_y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    return grad_y, xhat, grad_y * weight


@triton.jit
def _backward_columns(grad_y_ptr, x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr, shift_global_ptr,
                      gate_ptr, weight_ptr, mean_ptr, rstd_ptr, grad_x_ptr, grad_scale_local_ptr,
                      grad_shift_local_ptr, partial_ptr, program, sample, tile, length, dim, cols, c1s, c2s,
                      HAS_SCALE_LOCAL: tl.constexpr, HAS_SHIFT_LOCAL: tl.constexpr, HAS_SCALE_GLOBAL: tl.constexpr,
                      HAS_SHIFT_GLOBAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      WHOLE_ROW: tl.constexpr, ROWS: tl.constexpr):
    """The gradients of one tile's ROWS rows over the columns `cols`, and the tile's partial sums there.
    With WHOLE_ROW, `cols` is the whole row and each row's c1 = mean(grad_y * weight) and
    c2 = mean(grad_y * weight * xhat) are summed here; otherwise row i's come in c1s[i] and c2s[i]."""
    col_mask = cols < dim
    global_offs = sample * dim + cols
    gate = tl.full(cols.shape, 1.0, tl.float32)
    if HAS_GATE:
        gate = tl.load(gate_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    weight = tl.full(cols.shape, 1.0, tl.float32)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    expand_global = tl.full(cols.shape, 1.0, tl.float32)
    if HAS_SCALE_GLOBAL:
        expand_global = 1.0 + tanh(tl.load(scale_global_ptr + global_offs, mask=col_mask, other=0.0).to(tl.float32))
    row_ids = tl.arange(0, ROWS)
    sum_gate = tl.zeros(cols.shape, tl.float32)
    sum_weight = tl.zeros(cols.shape, tl.float32)
    sum_bias = tl.zeros(cols.shape, tl.float32)
    sum_expand_global = tl.zeros(cols.shape, tl.float32)
    sum_shift_global = tl.zeros(cols.shape, tl.float32)
    for i in range(ROWS):
        position = tile * ROWS + i
        in_range = position < length
        mask = col_mask & in_range
        row = sample * length + position
        offs = row * dim + cols
        mean = tl.load(mean_ptr + row, mask=in_range, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=in_range, other=0.0)
        x, s, u, h, tanh_local = _row_h(x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr,
                                        shift_global_ptr, gate_ptr, offs, global_offs, cols, mask, HAS_SCALE_LOCAL,
                                        HAS_SHIFT_LOCAL, HAS_SCALE_GLOBAL, HAS_SHIFT_GLOBAL, HAS_GATE)
        grad_y, xhat, grad_xhat = _grad_xhat(grad_y_ptr, offs, mask, h, mean, rstd, weight)
        if WHOLE_ROW:
            c1 = tl.sum(grad_xhat, axis=0) / dim
            c2 = tl.sum(grad_xhat * xhat, axis=0) / dim
        else:
            c1 = tl.sum(tl.where(row_ids == i, c1s, 0.0), axis=0)
            c2 = tl.sum(tl.where(row_ids == i, c2s, 0.0), axis=0)
        grad_h = tl.where(mask, rstd * (grad_xhat - c1 - xhat * c2), 0.0)
        grad_h_gated = grad_h * gate
        sum_gate += grad_h * u
        sum_weight += grad_y * xhat
        sum_bias += grad_y
        sum_expand_global += grad_h_gated * x * (1.0 + tanh_local)
        sum_shift_global += grad_h_gated
        tl.store(grad_x_ptr + offs, (grad_h + grad_h_gated * (s - 1.0)).to(grad_x_ptr.dtype.element_ty), mask=mask)
        if HAS_SHIFT_LOCAL:
            tl.store(grad_shift_local_ptr + offs, grad_h_gated.to(grad_shift_local_ptr.dtype.element_ty), mask=mask)
        if HAS_SCALE_LOCAL:
            grad_scale = grad_h_gated * x * expand_global * (1.0 - tanh_local * tanh_local)
            tl.store(grad_scale_local_ptr + offs, grad_scale.to(grad_scale_local_ptr.dtype.element_ty), mask=mask)

    # Order along the partial buffer's axis 2: GATE, WEIGHT, BIAS, EXPAND_GLOBAL, SHIFT_GLOBAL.
    partial = partial_ptr + program * 5 * dim + cols  # program == sample * tiles + tile
    tl.store(partial + 0 * dim, sum_gate, mask=col_mask)
    tl.store(partial + 1 * dim, sum_weight, mask=col_mask)
    tl.store(partial + 2 * dim, sum_bias, mask=col_mask)
    tl.store(partial + 3 * dim, sum_expand_global, mask=col_mask)
    tl.store(partial + 4 * dim, sum_shift_global, mask=col_mask)


@triton.jit
def _backward_kernel(grad_y_ptr, x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr, shift_global_ptr,
                     gate_ptr, weight_ptr, mean_ptr, rstd_ptr, grad_x_ptr, grad_scale_local_ptr,
                     grad_shift_local_ptr, partial_ptr, batch_size, length, dim,
                     HAS_SCALE_LOCAL: tl.constexpr, HAS_SHIFT_LOCAL: tl.constexpr, HAS_SCALE_GLOBAL: tl.constexpr,
                     HAS_SHIFT_GLOBAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # A one-dimensional grid: a long sample has more tiles than a grid's second axis takes (65535).
    program = tl.program_id(0).to(tl.int64)
    tiles = tl.num_programs(0) // batch_size
    unused = tl.zeros([ROWS], tl.float32)  # c1, c2 are summed over the whole row inside
    _backward_columns(grad_y_ptr, x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr, shift_global_ptr,
                      gate_ptr, weight_ptr, mean_ptr, rstd_ptr, grad_x_ptr, grad_scale_local_ptr, grad_shift_local_ptr,
                      partial_ptr, program, program // tiles, program % tiles, length, dim, tl.arange(0, BLOCK_D),
                      unused, unused, HAS_SCALE_LOCAL, HAS_SHIFT_LOCAL, HAS_SCALE_GLOBAL, HAS_SHIFT_GLOBAL, HAS_GATE,
                      HAS_WEIGHT, True, ROWS)


@triton.jit
def _wide_backward_kernel(grad_y_ptr, x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr, shift_global_ptr,
                          gate_ptr, weight_ptr, mean_ptr, rstd_ptr, grad_x_ptr, grad_scale_local_ptr,
                          grad_shift_local_ptr, partial_ptr, batch_size, length, dim,
                          HAS_SCALE_LOCAL: tl.constexpr, HAS_SHIFT_LOCAL: tl.constexpr,
                          HAS_SCALE_GLOBAL: tl.constexpr, HAS_SHIFT_GLOBAL: tl.constexpr, HAS_GATE: tl.constexpr,
                          HAS_WEIGHT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """_backward_kernel for rows wider than one block: the same tiles and partial sums, chunk by chunk."""
    program = tl.program_id(0).to(tl.int64)
    tiles = tl.num_programs(0) // batch_size
    sample = program // tiles
    tile = program % tiles
    row_ids = tl.arange(0, ROWS)
    # Pass 1: each row's c1 and c2, which every chunk of its gradient needs, kept in a ROWS-vector.
    c1s = tl.zeros([ROWS], tl.float32)
    c2s = tl.zeros([ROWS], tl.float32)
    for i in range(ROWS):
        position = tile * ROWS + i
        in_range = position < length
        row = sample * length + position
        mean = tl.load(mean_ptr + row, mask=in_range, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=in_range, other=0.0)
        sum_grad_xhat = tl.zeros([BLOCK_D], tl.float32)
        sum_grad_xhat_xhat = tl.zeros([BLOCK_D], tl.float32)
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_mask = cols < dim
            mask = col_mask & in_range
            offs = row * dim + cols
            weight = tl.full([BLOCK_D], 1.0, tl.float32)
            if HAS_WEIGHT:
                weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            _, _, _, h, _ = _row_h(x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr, shift_global_ptr,
                                   gate_ptr, offs, sample * dim + cols, cols, mask, HAS_SCALE_LOCAL, HAS_SHIFT_LOCAL,
                                   HAS_SCALE_GLOBAL, HAS_SHIFT_GLOBAL, HAS_GATE)
            _, xhat, grad_xhat = _grad_xhat(grad_y_ptr, offs, mask, h, mean, rstd, weight)
            sum_grad_xhat += grad_xhat
            sum_grad_xhat_xhat += grad_xhat * xhat
        c1s = tl.where(row_ids == i, tl.sum(sum_grad_xhat, axis=0) / dim, c1s)
        c2s = tl.where(row_ids == i, tl.sum(sum_grad_xhat_xhat, axis=0) / dim, c2s)
    # Pass 2: chunk by chunk, every row's gradients and the tile's partial sums of that chunk.
    for start in range(0, dim, BLOCK_D):
        _backward_columns(grad_y_ptr, x_ptr, scale_local_ptr, shift_local_ptr, scale_global_ptr, shift_global_ptr,
                          gate_ptr, weight_ptr, mean_ptr, rstd_ptr, grad_x_ptr, grad_scale_local_ptr,
                          grad_shift_local_ptr, partial_ptr, program, sample, tile, length, dim,
                          start + tl.arange(0, BLOCK_D), c1s, c2s, HAS_SCALE_LOCAL, HAS_SHIFT_LOCAL, HAS_SCALE_GLOBAL,
                          HAS_SHIFT_GLOBAL, HAS_GATE, HAS_WEIGHT, False, ROWS)


def _flags(scale_local, shift_local, scale_global, shift_global, gate):
    return dict(HAS_SCALE_LOCAL=scale_local is not None, HAS_SHIFT_LOCAL=shift_local is not None,
                HAS_SCALE_GLOBAL=scale_global is not None, HAS_SHIFT_GLOBAL=shift_global is not None,
                HAS_GATE=gate is not None)


def _or(tensor, placeholder):
    """Triton needs a pointer for every argument; absent ones get a placeholder the kernel never reads."""
    return placeholder if tensor is None else tensor.contiguous()


def forward(x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias, eps):
    """Returns (y, mean, rstd) with mean and rstd in float32 of shape (B, L)."""
    batch, length, dim = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    mean = torch.empty((batch, length), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if y.numel() == 0:  # with D == 0 the statistics are defined as zeros, as in the C++ backends
        return y, mean.zero_(), rstd.zero_()
    block, num_warps, whole_row = row_block(dim)
    (_forward_kernel if whole_row else _wide_forward_kernel)[(batch * length,)](
        x, _or(scale_local, x), _or(shift_local, x), _or(scale_global, x), _or(shift_global, x), _or(gate, x),
        _or(weight, x), _or(bias, x), y, mean, rstd, length, dim, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        **_flags(scale_local, shift_local, scale_global, shift_global, gate),
        BLOCK_D=block, num_warps=num_warps, enable_fp_fusion=False,  # h must round as in the backward
    )
    return y, mean, rstd


def backward(grad_y, x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias, mean, rstd):
    """Gradients in argument order; an absent optional argument gets an empty tensor."""
    batch, length, dim = x.shape
    x = x.contiguous()
    def absent():  # a fresh empty tensor each time: outputs of a custom op may not alias each other
        return x.new_empty(0)

    grad_x = torch.empty_like(x)
    grad_scale_local = absent() if scale_local is None else torch.empty_like(x)
    grad_shift_local = absent() if shift_local is None else torch.empty_like(x)
    rows = min(MAX_ROWS_PER_PROGRAM, triton.next_power_of_2(max(length, 1)))
    tiles = triton.cdiv(length, rows)
    partial = torch.zeros((batch, tiles, 5, dim), device=x.device, dtype=torch.float32)
    if x.numel() > 0:
        block, num_warps, whole_row = row_block(dim)
        (_backward_kernel if whole_row else _wide_backward_kernel)[(batch * tiles,)](
            grad_y.contiguous(), x, _or(scale_local, x), _or(shift_local, x), _or(scale_global, x),
            _or(shift_global, x), _or(gate, x), _or(weight, x), mean.contiguous(), rstd.contiguous(),
            grad_x, grad_scale_local if scale_local is not None else x,
            grad_shift_local if shift_local is not None else x, partial, batch, length, dim,
            HAS_WEIGHT=weight is not None, **_flags(scale_local, shift_local, scale_global, shift_global, gate),
            ROWS=rows, BLOCK_D=block, num_warps=num_warps,
            # No fused multiply-adds, here and in the forward: the recomputed h must equal the forward's
            # bit for bit, and grad_y * weight must round the same in c1 and in grad_xhat - c1, or a
            # one-column row (h == mean, gradient exactly zero) is left with rounding error times rstd.
            enable_fp_fusion=False,
        )
    # Second pass: fixed-shape reductions over the programs' partials (deterministic, no atomics).
    channel_sums = partial.sum(dim=(0, 1))
    sample_sums = partial.sum(dim=1)

    def grad_of(arg, value):
        return absent() if arg is None else value.to(x.dtype, copy=True)  # the sums share one buffer

    grad_scale_global = absent()
    if scale_global is not None:
        tanh_global = torch.tanh(scale_global.float())
        grad_scale_global = (sample_sums[:, EXPAND_GLOBAL] * (1 - tanh_global * tanh_global)).to(x.dtype)
    return (grad_x, grad_scale_local, grad_shift_local, grad_scale_global,
            grad_of(shift_global, sample_sums[:, SHIFT_GLOBAL]), grad_of(gate, channel_sums[GATE]),
            grad_of(weight, channel_sums[WEIGHT]), grad_of(bias, channel_sums[BIAS]))
