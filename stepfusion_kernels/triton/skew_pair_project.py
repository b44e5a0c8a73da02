"""Triton kernels of `skew_pair_project`: a grouped GEMM whose programs read the layer index of
their pair from `pairs` and the rows of that layer in place (no gathered copy of the stacks).

forward:      one launch, one program per (pair side, N tile, F tile), all on grid axis 0 (so no grid
              limit on N); side 0 writes pa, side 1 pb.
d_h:          one launch, one program per (layer of LA + LB, N tile, E tile) on grid axis 0; a program
              adds the products of the pairs of its layer in a fixed order (pairs stably sorted by
              layer), so the sum over pairs that share a layer is deterministic without atomics.
              Unused layers get 0.
d_weight:     one launch per weight, grid (P or 1 weights, F tiles, E tiles), summing over pairs
              and rows in a fixed order.

Tiles: on a GPU every kernel is autotuned over (rows, columns, reduction) tiles, warps and pipeline
stages, keyed on (N, E, F) and the dtype: large tensor-core tiles for fp16/bf16, smaller ones for fp32
(which keeps full-precision dots). The interpreter runs one tile sized to the problem. Every kernel
writes each output element exactly once, so the autotuner's repeated launches leave no trace.
"""

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted

MIN_DOT_BLOCK = 16  # tl.dot needs every block dimension to be at least 16
MAX_BLOCK = 64      # largest block of the interpreter's one tile


def _block(size, largest=MAX_BLOCK):
    """The interpreter's block for a dimension of `size`: its next power of two, within [16, largest]."""
    return min(largest, max(MIN_DOT_BLOCK, triton.next_power_of_2(max(size, 1))))


# GPU tiles (rows, columns, reduction, warps, stages) of the output tile each program computes.
TENSOR_CORE_TILES = ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                     (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 128, 64, 4, 4),
                     (16, 128, 64, 4, 4), (16, 64, 64, 4, 4))
FP32_TILES = ((128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3), (32, 64, 32, 4, 3), (16, 64, 32, 4, 3))
TUNING_KEY = ("samples", "in_features", "out_features")  # the autotuner adds the dtypes


def tile_configs(tiles, rows, columns, reduction):
    """triton.Configs of `tiles` with their sizes under a kernel's block names."""
    return [triton.Config({rows: r, columns: c, reduction: k}, num_warps=warps, num_stages=stages)
            for r, c, k, warps, stages in tiles]


def keep_fitting_tiles(rows, row_count):
    """An early_config_prune: drops tiles more than twice as tall as the next power of two of the row
    count (argument `row_count`), which would mostly compute masked rows; the shortest tile always stays."""
    def prune(configs, named_args, **kwargs):
        limit = 2 * max(MIN_DOT_BLOCK, triton.next_power_of_2(max(int(named_args[row_count]), 1)))
        fitting = [c for c in configs if c.kwargs[rows] <= limit]
        return fitting or [min(configs, key=lambda c: c.kwargs[rows])]
    return prune


def autotuned(kernel, rows, columns, reduction, row_count):
    """{dot_fp32: launcher}: `kernel` autotuned over the fp32 tiles and over the tensor-core tiles."""
    def tuned(tiles):
        return triton.autotune(configs=tile_configs(tiles, rows, columns, reduction), key=list(TUNING_KEY),
                               prune_configs_by={"early_config_prune": keep_fitting_tiles(rows, row_count)})(kernel)
    return {True: tuned(FP32_TILES), False: tuned(TENSOR_CORE_TILES)}


def _launch(kernels, grid, args, blocks, **constexprs):
    """kernels = (jit kernel, autotuned launchers). On a GPU the autotuner picks the tile; the interpreter
    runs the given `blocks` with one warp. `grid` maps the block sizes to the launch grid."""
    kernel, tuned = kernels
    if triton_interpreted():
        kernel[grid(blocks)](*args, **constexprs, **blocks, num_warps=1)
    else:
        tuned[constexprs["DOT_FP32"]][grid](*args, **constexprs)


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr):
    # fp32 inputs keep full precision (no tf32: the fp32 tolerance is 1e-5); the interpreter's
    # low-precision dot is unreliable, so there every operand is fp32 as well.
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _forward_kernel(ha_ptr, hb_ptr, pairs_ptr, weight_a_ptr, bias_a_ptr, weight_b_ptr, bias_b_ptr, pa_ptr, pb_ptr,
                    samples, in_features, out_features,
                    PER_PAIR: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    row_tiles = tl.cdiv(samples, BLOCK_N)
    tiles = row_tiles * tl.cdiv(out_features, BLOCK_F)
    program = tl.program_id(0).to(tl.int64)
    task = program // tiles  # 2k + side: also the flat index of pairs[k, side]
    tile = program % tiles
    pair = task // 2
    layer = tl.load(pairs_ptr + task)
    if task % 2 == 0:
        x_ptr = ha_ptr
        w_ptr = weight_a_ptr
        b_ptr = bias_a_ptr
        out_ptr = pa_ptr
    else:
        x_ptr = hb_ptr
        w_ptr = weight_b_ptr
        b_ptr = bias_b_ptr
        out_ptr = pb_ptr
    if PER_PAIR:
        w_ptr += pair * out_features * in_features
        b_ptr += pair * out_features
    rows = (tile % row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # neighbouring programs share columns
    cols = (tile // row_tiles) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_mask = rows < samples
    col_mask = cols < out_features
    x_rows = x_ptr + (layer * samples + rows[:, None]) * in_features
    acc = tl.zeros((BLOCK_N, BLOCK_F), dtype=tl.float32)
    for e_begin in range(0, in_features, BLOCK_E):
        e = e_begin + tl.arange(0, BLOCK_E)
        e_mask = e < in_features
        x = tl.load(x_rows + e[None, :], mask=row_mask[:, None] & e_mask[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * in_features + e[:, None], mask=e_mask[:, None] & col_mask[None, :],
                      other=0.0)
        acc = _dot(x, w_t, acc, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + (pair * samples + rows[:, None]) * out_features + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grad_stack_kernel(grad_pa_ptr, grad_pb_ptr, weight_a_ptr, weight_b_ptr, order_ptr, offsets_ptr,
                       grad_ha_ptr, grad_hb_ptr, num_pairs, layers_a, samples, in_features, out_features,
                       PER_PAIR: tl.constexpr, DOT_FP32: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    row_tiles = tl.cdiv(samples, BLOCK_N)
    tiles = row_tiles * tl.cdiv(in_features, BLOCK_E)
    program = tl.program_id(0).to(tl.int64)
    slot = program // tiles  # layer of A (slot < LA) or layer slot - LA of B
    tile = program % tiles
    if slot < layers_a:
        side = 0
        layer = slot
        g_ptr = grad_pa_ptr
        w_ptr = weight_a_ptr
        out_ptr = grad_ha_ptr
    else:
        side = 1
        layer = slot - layers_a
        g_ptr = grad_pb_ptr
        w_ptr = weight_b_ptr
        out_ptr = grad_hb_ptr
    rows = (tile % row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (tile // row_tiles) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_mask = rows < samples
    col_mask = cols < in_features
    acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    segment_begin = tl.load(offsets_ptr + slot)
    segment_end = tl.load(offsets_ptr + slot + 1)
    for position in range(segment_begin, segment_end):
        pair = tl.load(order_ptr + position) - side * num_pairs
        g_rows = g_ptr + (pair * samples + rows[:, None]) * out_features
        w_pair = w_ptr
        if PER_PAIR:
            w_pair += pair * out_features * in_features
        for f_begin in range(0, out_features, BLOCK_F):
            f = f_begin + tl.arange(0, BLOCK_F)
            f_mask = f < out_features
            g = tl.load(g_rows + f[None, :], mask=row_mask[:, None] & f_mask[None, :], other=0.0)
            w = tl.load(w_pair + f[:, None] * in_features + cols[None, :], mask=f_mask[:, None] & col_mask[None, :],
                        other=0.0)
            acc = _dot(g, w, acc, DOT_FP32)
    out = out_ptr + (layer * samples + rows[:, None]) * in_features + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _accumulate_side(acc, grad_ptr, stack_ptr, pairs_ptr, column, pair, samples, in_features, out_features,
                     f, f_mask, e, e_mask, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc += grad[pair].T @ stack[pairs[pair, column]] over every row, restricted to (f, e)."""
    layer = tl.load(pairs_ptr + pair * 2 + column)
    for n_begin in range(0, samples, BLOCK_N):
        n = n_begin + tl.arange(0, BLOCK_N)
        n_mask = n < samples
        g_t = tl.load(grad_ptr + (pair * samples + n[None, :]) * out_features + f[:, None],
                      mask=f_mask[:, None] & n_mask[None, :], other=0.0)
        x = tl.load(stack_ptr + (layer * samples + n[:, None]) * in_features + e[None, :],
                    mask=n_mask[:, None] & e_mask[None, :], other=0.0)
        acc = _dot(g_t, x, acc, DOT_FP32)
    return acc


@triton.jit
def _grad_weight_kernel(grad_first_ptr, stack_first_ptr, grad_second_ptr, stack_second_ptr, pairs_ptr,
                        grad_weight_ptr, first_column, num_pairs, samples, in_features, out_features,
                        PER_PAIR: tl.constexpr, HAS_SECOND: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    e = tl.program_id(2).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    f_mask = f < out_features
    e_mask = e < in_features
    if PER_PAIR:  # weight slot is pair slot's own
        pair_begin = slot
        pair_end = slot + 1
    else:  # one weight: every pair adds to it
        pair_begin = 0
        pair_end = num_pairs
    acc = tl.zeros((BLOCK_F, BLOCK_E), dtype=tl.float32)
    for pair in range(pair_begin, pair_end):
        acc = _accumulate_side(acc, grad_first_ptr, stack_first_ptr, pairs_ptr, first_column, pair, samples,
                               in_features, out_features, f, f_mask, e, e_mask, DOT_FP32, BLOCK_N)
        if HAS_SECOND:  # B shares A's weight: its pairs add to the same gradient, column 1 of pairs
            acc = _accumulate_side(acc, grad_second_ptr, stack_second_ptr, pairs_ptr, 1, pair, samples,
                                   in_features, out_features, f, f_mask, e, e_mask, DOT_FP32, BLOCK_N)
    out = grad_weight_ptr + (slot * out_features + f[:, None]) * in_features + e[None, :]
    tl.store(out, acc.to(grad_weight_ptr.dtype.element_ty), mask=f_mask[:, None] & e_mask[None, :])


FORWARD = (_forward_kernel, autotuned(_forward_kernel, "BLOCK_N", "BLOCK_F", "BLOCK_E", "samples"))
GRAD_STACK = (_grad_stack_kernel, autotuned(_grad_stack_kernel, "BLOCK_N", "BLOCK_E", "BLOCK_F", "samples"))
GRAD_WEIGHT = (_grad_weight_kernel, autotuned(_grad_weight_kernel, "BLOCK_F", "BLOCK_E", "BLOCK_N", "out_features"))


def _dot_fp32(dtype):
    return dtype == torch.float32 or triton_interpreted()


def _bias_or_zeros(bias, per_pair, num_pairs, out_features, like):
    """A bias to add: the given one, or zeros when only the other side has one."""
    if bias is not None:
        return bias.contiguous()
    shape = (num_pairs, out_features) if per_pair else (out_features,)
    return like.new_zeros(shape)


def forward(ha, hb, pairs, weight_a, bias_a, weight_b, bias_b):
    """Returns (pa, pb), each (P, N, F) in ha's dtype."""
    samples, in_features = ha.shape[1], ha.shape[2]
    num_pairs, out_features = pairs.shape[0], weight_a.shape[-2]
    per_pair = weight_a.dim() == 3
    pa = ha.new_empty((num_pairs, samples, out_features))
    pb = ha.new_empty((num_pairs, samples, out_features))
    if pa.numel() == 0:
        return pa, pb
    if weight_b is None:
        weight_b, bias_b = weight_a, bias_a
    has_bias = bias_a is not None or bias_b is not None
    if has_bias:
        bias_a = _bias_or_zeros(bias_a, per_pair, num_pairs, out_features, ha)
        bias_b = _bias_or_zeros(bias_b, per_pair, num_pairs, out_features, ha)
    pairs = pairs.to(ha.device)  # pairs may be given on the CPU
    _launch(FORWARD,
            lambda meta: (2 * num_pairs * triton.cdiv(samples, meta["BLOCK_N"])
                          * triton.cdiv(out_features, meta["BLOCK_F"]),),
            (ha.contiguous(), hb.contiguous(), pairs.contiguous(), weight_a.contiguous(),
             bias_a if has_bias else ha, weight_b.contiguous(), bias_b if has_bias else ha, pa, pb,
             samples, in_features, out_features),
            {"BLOCK_N": _block(samples), "BLOCK_F": _block(out_features), "BLOCK_E": _block(in_features, 32)},
            PER_PAIR=per_pair, HAS_BIAS=has_bias, DOT_FP32=_dot_fp32(ha.dtype))
    return pa, pb


def _layer_segments(pairs, layers_a, layers_b):
    """(order, offsets): the 2P pair sides sorted stably by layer (A's layers first, then B's), and
    where each layer's run starts. An entry v of order is pair v of A (v < P) or pair v - P of B."""
    keys = torch.cat([pairs[:, 0], pairs[:, 1] + layers_a])
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=layers_a + layers_b)
    offsets = torch.zeros(layers_a + layers_b + 1, dtype=torch.int64, device=pairs.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def backward(grad_pa, grad_pb, ha, hb, pairs, weight_a, bias_a, weight_b, bias_b):
    """(grad_ha, grad_hb, grad_weight_a, grad_bias_a, grad_weight_b, grad_bias_b); the gradients of an
    absent bias, and of weight_b / bias_b when B shares A's weight, are empty tensors."""
    layers_a, samples, in_features = ha.shape
    layers_b = hb.shape[0]
    num_pairs, out_features = pairs.shape[0], weight_a.shape[-2]
    per_pair = weight_a.dim() == 3
    shared = weight_b is None
    ha, hb, pairs = ha.contiguous(), hb.contiguous(), pairs.to(ha.device).contiguous()
    grad_pa, grad_pb = grad_pa.contiguous(), grad_pb.contiguous()
    weight_a = weight_a.contiguous()
    weight_b = weight_a if shared else weight_b.contiguous()

    def absent():  # a fresh empty tensor each time: outputs of a custom op may not alias each other
        return ha.new_empty(0)

    grad_ha = torch.zeros_like(ha)
    grad_hb = torch.zeros_like(hb)
    grad_weight_a = torch.zeros_like(weight_a)
    grad_weight_b = absent() if shared else torch.zeros_like(weight_b)
    dot_fp32 = _dot_fp32(ha.dtype)
    if num_pairs > 0 and samples > 0 and in_features > 0 and out_features > 0:
        order, offsets = _layer_segments(pairs, layers_a, layers_b)
        _launch(GRAD_STACK,
                lambda meta: ((layers_a + layers_b) * triton.cdiv(samples, meta["BLOCK_N"])
                              * triton.cdiv(in_features, meta["BLOCK_E"]),),
                (grad_pa, grad_pb, weight_a, weight_b, order, offsets, grad_ha, grad_hb,
                 num_pairs, layers_a, samples, in_features, out_features),
                {"BLOCK_N": _block(samples), "BLOCK_F": _block(out_features, 32), "BLOCK_E": _block(in_features)},
                PER_PAIR=per_pair, DOT_FP32=dot_fp32)
        def weight_grid(meta):
            return (num_pairs if per_pair else 1, triton.cdiv(out_features, meta["BLOCK_F"]),
                    triton.cdiv(in_features, meta["BLOCK_E"]))

        launches = [(grad_weight_a, grad_pa, ha, 0)] + ([] if shared else [(grad_weight_b, grad_pb, hb, 1)])
        for grad_weight, grad_first, stack_first, column in launches:
            _launch(GRAD_WEIGHT, weight_grid,
                    (grad_first, stack_first, grad_pb, hb, pairs, grad_weight, column,
                     num_pairs, samples, in_features, out_features),
                    {"BLOCK_N": _block(samples, 32), "BLOCK_F": _block(out_features), "BLOCK_E": _block(in_features)},
                    PER_PAIR=per_pair, HAS_SECOND=shared, DOT_FP32=dot_fp32)

    # Bias gradients: fixed-shape sums over rows (and pairs), deterministic on CPU and GPU.
    reduce_dims = (1,) if per_pair else (0, 1)
    sum_a = grad_pa.float().sum(reduce_dims)
    sum_b = grad_pb.float().sum(reduce_dims)
    grad_bias_a = absent() if bias_a is None else (sum_a + sum_b if shared else sum_a).to(ha.dtype)
    grad_bias_b = absent() if bias_b is None else sum_b.to(ha.dtype)
    return grad_ha, grad_hb, grad_weight_a, grad_bias_a, grad_weight_b, grad_bias_b
