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

TMA kernels (Hopper, fp16/bf16; opt-in with STEPFUSION_SKEW_TRITON_TMA=1 until measured in this form on
a GPU): the same three products with every tile moved by tensor-memory-accelerator descriptors made on
the host over the 3-D stacks (L, N, E), outputs (P, N, F) and weights (P or 1, F, E), so a tile that
runs past its layer's N rows is clipped by the hardware instead of masked. The forward is persistent
(one program per SM walks the tiles); d_weight splits a shared weight's pairs over TMA_SPLITS programs per
tile into float32 partials added in order. They need 16-byte rows (E and F multiples of 8 in 16-bit
types) and 16-byte-aligned tensors; other calls take the pointer kernels. An experiment with the same
design (scripts/skew_triton_tma.py) reached 525 TFLOP/s forward and 475 for d_h on an H100, against
318-356 and 263 (d_h and d_weight) for the pointer kernels (benchmarks/results/h100-2026-11-23.md).
"""

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

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
    def prune(configs, named_args, **kwargs):  # the autotuner names positional arguments only in named_args
        count = {**named_args, **kwargs}[row_count]
        limit = 2 * max(MIN_DOT_BLOCK, triton.next_power_of_2(max(int(count), 1)))
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


# ---- TMA kernels. Descriptors cover whole 3-D tensors: a stack (L, N, E) is read in [1, rows, columns]
# tiles at [layer, row, column], so a tile is clipped at its own layer's last row.


@triton.jit
def _tma_project_tile(x_desc, w_desc, out_desc, b_ptr, layer, slot, pair, row, col, in_features, out_features,
                      HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[pair, row tile, col tile] = x[layer] @ w[slot].T (+ b[slot])."""
    acc = tl.zeros((BLOCK_N, BLOCK_F), dtype=tl.float32)
    for e in range(0, in_features, BLOCK_E):
        x = x_desc.load([layer, row, e]).reshape(BLOCK_N, BLOCK_E)
        w = w_desc.load([slot, col, e]).reshape(BLOCK_F, BLOCK_E)
        acc = _dot(x, w.T, acc, DOT_FP32)
    if HAS_BIAS:
        cols = col + tl.arange(0, BLOCK_F)
        acc += tl.load(b_ptr + slot * out_features + cols, mask=cols < out_features, other=0.0).to(tl.float32)[None, :]
    out_desc.store([pair, row, col], acc.to(out_desc.dtype).reshape(1, BLOCK_N, BLOCK_F))


@triton.jit
def _tma_forward_kernel(ha_desc, hb_desc, pairs_ptr, weight_a_desc, bias_a_ptr, weight_b_desc, bias_b_ptr, pa_desc,
                        pb_desc, num_pairs, samples, in_features, out_features,
                        PER_PAIR: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    # Persistent: program p takes tiles p, p + programs, ... of the 2P problems (2k + side) in turn.
    row_tiles = tl.cdiv(samples, BLOCK_N)
    tiles = row_tiles * tl.cdiv(out_features, BLOCK_F)
    for program in tl.range(tl.program_id(0), 2 * num_pairs * tiles, tl.num_programs(0)):
        task = program // tiles  # also the flat index of pairs[k, side]
        tile = program % tiles
        pair = task // 2
        layer = tl.load(pairs_ptr + task).to(tl.int32)
        slot = pair if PER_PAIR else 0
        row = (tile % row_tiles) * BLOCK_N
        col = (tile // row_tiles) * BLOCK_F
        if task % 2 == 0:
            _tma_project_tile(ha_desc, weight_a_desc, pa_desc, bias_a_ptr, layer, slot, pair, row, col, in_features,
                              out_features, HAS_BIAS, DOT_FP32, BLOCK_N, BLOCK_F, BLOCK_E)
        else:
            _tma_project_tile(hb_desc, weight_b_desc, pb_desc, bias_b_ptr, layer, slot, pair, row, col, in_features,
                              out_features, HAS_BIAS, DOT_FP32, BLOCK_N, BLOCK_F, BLOCK_E)


@triton.jit
def _tma_layer_sum(g_desc, w_desc, order_ptr, begin, end, first_pair, row, col, out_features,
                   PER_PAIR: tl.constexpr, DOT_FP32: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    """Sum over the sorted entries [begin, end) of one layer of grad_p[pair] @ W(pair), one tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for position in range(begin, end):
        pair = tl.load(order_ptr + position).to(tl.int32) - first_pair
        slot = pair if PER_PAIR else 0
        for f in range(0, out_features, BLOCK_F):
            g = g_desc.load([pair, row, f]).reshape(BLOCK_N, BLOCK_F)
            w = w_desc.load([slot, f, col]).reshape(BLOCK_F, BLOCK_E)
            acc = _dot(g, w, acc, DOT_FP32)
    return acc


@triton.jit
def _tma_grad_stack_kernel(grad_pa_desc, grad_pb_desc, weight_a_desc, weight_b_desc, order_ptr, offsets_ptr,
                           grad_ha_desc, grad_hb_desc, num_pairs, layers_a, samples, in_features, out_features,
                           PER_PAIR: tl.constexpr, DOT_FP32: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    row_tiles = tl.cdiv(samples, BLOCK_N)
    tiles = row_tiles * tl.cdiv(in_features, BLOCK_E)
    slot = tl.program_id(0) // tiles  # layer of A (slot < LA) or layer slot - LA of B
    tile = tl.program_id(0) % tiles
    row = (tile % row_tiles) * BLOCK_N
    col = (tile // row_tiles) * BLOCK_E
    begin = tl.load(offsets_ptr + slot)
    end = tl.load(offsets_ptr + slot + 1)
    # Two branches rather than chosen descriptors: each side keeps its own descriptors.
    if slot < layers_a:
        acc = _tma_layer_sum(grad_pa_desc, weight_a_desc, order_ptr, begin, end, 0, row, col, out_features,
                             PER_PAIR, DOT_FP32, BLOCK_N, BLOCK_F, BLOCK_E)
        grad_ha_desc.store([slot, row, col], acc.to(grad_ha_desc.dtype).reshape(1, BLOCK_N, BLOCK_E))
    else:
        acc = _tma_layer_sum(grad_pb_desc, weight_b_desc, order_ptr, begin, end, num_pairs, row, col, out_features,
                             PER_PAIR, DOT_FP32, BLOCK_N, BLOCK_F, BLOCK_E)
        grad_hb_desc.store([slot - layers_a, row, col], acc.to(grad_hb_desc.dtype).reshape(1, BLOCK_N, BLOCK_E))


@triton.jit
def _tma_weight_terms(acc, g_desc, x_desc, pairs_ptr, column, pair, samples, f0, e0, DOT_FP32: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    """acc += grad[pair].T @ stack[pairs[pair, column]] over every row, one (F, E) tile."""
    layer = tl.load(pairs_ptr + pair * 2 + column).to(tl.int32)
    for n in range(0, samples, BLOCK_N):
        g = g_desc.load([pair, n, f0]).reshape(BLOCK_N, BLOCK_F)
        x = x_desc.load([layer, n, e0]).reshape(BLOCK_N, BLOCK_E)
        acc = _dot(g.T, x, acc, DOT_FP32)
    return acc


@triton.jit
def _tma_grad_weight_kernel(grad_first_desc, stack_first_desc, grad_second_desc, stack_second_desc, pairs_ptr,
                            out_ptr, first_column, num_pairs, splits, samples, in_features, out_features,
                            PER_PAIR: tl.constexpr, HAS_SECOND: tl.constexpr, DOT_FP32: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    # Program (slot, split) sums the pairs split, split + splits, ... of weight slot into out[slot * splits
    # + split]: the gradient itself when splits = 1, else a float32 partial that the launcher adds in order.
    part = tl.program_id(0)
    slot = part // splits
    split = part % splits
    f0 = tl.program_id(1) * BLOCK_F
    e0 = tl.program_id(2) * BLOCK_E
    if PER_PAIR:
        pair_begin = slot
        pair_end = slot + 1
    else:
        pair_begin = 0
        pair_end = num_pairs
    acc = tl.zeros((BLOCK_F, BLOCK_E), dtype=tl.float32)
    for pair in range(pair_begin + split, pair_end, splits):
        acc = _tma_weight_terms(acc, grad_first_desc, stack_first_desc, pairs_ptr, first_column, pair, samples, f0,
                                e0, DOT_FP32, BLOCK_N, BLOCK_F, BLOCK_E)
        if HAS_SECOND:  # B shares A's weight: its pairs add to the same gradient, column 1 of pairs
            acc = _tma_weight_terms(acc, grad_second_desc, stack_second_desc, pairs_ptr, 1, pair, samples, f0, e0,
                                    DOT_FP32, BLOCK_N, BLOCK_F, BLOCK_E)
    f = f0 + tl.arange(0, BLOCK_F)
    e = e0 + tl.arange(0, BLOCK_E)
    out = out_ptr + (part.to(tl.int64) * out_features + f[:, None]) * in_features + e[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(f[:, None] < out_features) & (e[None, :] < in_features))


def descriptor_blocks(shapes):
    """A Config pre_hook giving every descriptor argument its block shape from the config's block sizes:
    shapes = {argument: (block name, ...)}, each descriptor a [1, rows, columns] tile of a 3-D tensor."""
    def set_blocks(nargs):
        for name, blocks in shapes.items():
            nargs[name].block_shape = [1] + [nargs[block] for block in blocks]
    return set_blocks


def tma_autotuned(kernel, rows, columns, reduction, row_count, shapes, tiles=TENSOR_CORE_TILES):
    """(kernel, launcher autotuned over `tiles`, block-shape hook) of a TMA kernel."""
    set_blocks = descriptor_blocks(shapes)
    configs = [triton.Config({rows: r, columns: c, reduction: k}, num_warps=warps, num_stages=stages,
                             pre_hook=set_blocks) for r, c, k, warps, stages in tiles]
    tuned = triton.autotune(configs=configs, key=list(TUNING_KEY),
                            prune_configs_by={"early_config_prune": keep_fitting_tiles(rows, row_count)})(kernel)
    return kernel, tuned, set_blocks


def _launch_tma(kernels, grid, args, blocks, **constexprs):
    """As _launch, for a TMA kernel whose arguments are given by name: the interpreter sets the given
    `blocks` on the descriptors itself; on a GPU each config's pre_hook does."""
    kernel, tuned, set_blocks = kernels
    if triton_interpreted():
        set_blocks({**args, **blocks})
        kernel[grid(blocks)](**args, **constexprs, **blocks, num_warps=1)
    else:
        tuned[grid](**args, **constexprs)


# The TMA forward holds its tile loop twice (A's side and B's), each with its own pipeline buffers. These tiles
# would need 295-361 KB of shared memory, more than a block gets on an H100 or H200 (227 KB; measured by
# scripts/compile_triton.py), so they could never launch: its autotuner leaves them out.
TMA_FORWARD_OVERSIZED = ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4))
TMA_FORWARD = tma_autotuned(_tma_forward_kernel, "BLOCK_N", "BLOCK_F", "BLOCK_E", "samples", {
    "ha_desc": ("BLOCK_N", "BLOCK_E"), "hb_desc": ("BLOCK_N", "BLOCK_E"), "weight_a_desc": ("BLOCK_F", "BLOCK_E"),
    "weight_b_desc": ("BLOCK_F", "BLOCK_E"), "pa_desc": ("BLOCK_N", "BLOCK_F"), "pb_desc": ("BLOCK_N", "BLOCK_F")},
    tiles=tuple(tile for tile in TENSOR_CORE_TILES if tile not in TMA_FORWARD_OVERSIZED))
TMA_GRAD_STACK = tma_autotuned(_tma_grad_stack_kernel, "BLOCK_N", "BLOCK_E", "BLOCK_F", "samples", {
    "grad_pa_desc": ("BLOCK_N", "BLOCK_F"), "grad_pb_desc": ("BLOCK_N", "BLOCK_F"),
    "weight_a_desc": ("BLOCK_F", "BLOCK_E"), "weight_b_desc": ("BLOCK_F", "BLOCK_E"),
    "grad_ha_desc": ("BLOCK_N", "BLOCK_E"), "grad_hb_desc": ("BLOCK_N", "BLOCK_E")})
TMA_GRAD_WEIGHT = tma_autotuned(_tma_grad_weight_kernel, "BLOCK_F", "BLOCK_E", "BLOCK_N", "out_features", {
    "grad_first_desc": ("BLOCK_N", "BLOCK_F"), "stack_first_desc": ("BLOCK_N", "BLOCK_E"),
    "grad_second_desc": ("BLOCK_N", "BLOCK_F"), "stack_second_desc": ("BLOCK_N", "BLOCK_E")})
TMA_SETTING = "STEPFUSION_SKEW_TRITON_TMA"
TMA_ALIGNMENT = 16  # bytes: TMA needs it of every tensor's start and of every stride
TMA_SPLITS = 2      # programs per d_weight tile of a shared weight (2 filled an H100 at SSFN's shapes)


def use_tma(tensors, widths):
    """True when the TMA kernels are asked for (STEPFUSION_SKEW_TRITON_TMA=1) and can run: fp16/bf16 on a
    GPU of compute capability 9 or newer (any dtype in the interpreter), nonempty rows of `widths` elements
    that take a multiple of 16 bytes, and 16-byte-aligned `tensors`."""
    if os.environ.get(TMA_SETTING, "0") != "1":
        return False
    first = tensors[0]
    if not triton_interpreted() and (first.dtype not in (torch.float16, torch.bfloat16)
                                     or torch.cuda.get_device_capability(first.device)[0] < 9):
        return False
    return (all(width > 0 and width * first.element_size() % TMA_ALIGNMENT == 0 for width in widths)
            and all(t.data_ptr() % TMA_ALIGNMENT == 0 for t in tensors))


def _descriptor(tensor):
    """A descriptor over a contiguous 3-D tensor; its block shape is set per launch config."""
    return TensorDescriptor.from_tensor(tensor, [1, 16, 16])


def _stacked(weight):
    """A weight as (P or 1, F, E)."""
    return weight if weight.dim() == 3 else weight.unsqueeze(0)


def _programs(device):
    """How many programs a persistent kernel starts: one per SM (two in the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


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
    ha, hb, pairs = ha.contiguous(), hb.contiguous(), pairs.to(ha.device).contiguous()  # pairs may be on the CPU
    weight_a, weight_b = weight_a.contiguous(), weight_b.contiguous()
    bias_a, bias_b = (bias_a, bias_b) if has_bias else (ha, ha)  # unread without a bias

    def tiles(meta):
        return 2 * num_pairs * triton.cdiv(samples, meta["BLOCK_N"]) * triton.cdiv(out_features, meta["BLOCK_F"])

    blocks = {"BLOCK_N": _block(samples), "BLOCK_F": _block(out_features), "BLOCK_E": _block(in_features, 32)}
    constexprs = {"PER_PAIR": per_pair, "HAS_BIAS": has_bias, "DOT_FP32": _dot_fp32(ha.dtype)}
    if use_tma((ha, hb, weight_a, weight_b, pa, pb), (in_features, out_features)):
        programs = _programs(ha.device)
        _launch_tma(TMA_FORWARD, lambda meta: (min(programs, tiles(meta)),),
                    {"ha_desc": _descriptor(ha), "hb_desc": _descriptor(hb), "pairs_ptr": pairs,
                     "weight_a_desc": _descriptor(_stacked(weight_a)), "bias_a_ptr": bias_a,
                     "weight_b_desc": _descriptor(_stacked(weight_b)), "bias_b_ptr": bias_b,
                     "pa_desc": _descriptor(pa), "pb_desc": _descriptor(pb), "num_pairs": num_pairs,
                     "samples": samples, "in_features": in_features, "out_features": out_features},
                    blocks, **constexprs)
    else:
        _launch(FORWARD, lambda meta: (tiles(meta),),
                (ha, hb, pairs, weight_a, bias_a, weight_b, bias_b, pa, pb, samples, in_features, out_features),
                blocks, **constexprs)
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
        tma = use_tma((ha, hb, grad_pa, grad_pb, weight_a, weight_b, grad_ha, grad_hb), (in_features, out_features))
        order, offsets = _layer_segments(pairs, layers_a, layers_b)

        def stack_grid(meta):
            return ((layers_a + layers_b) * triton.cdiv(samples, meta["BLOCK_N"])
                    * triton.cdiv(in_features, meta["BLOCK_E"]),)

        stack_blocks = {"BLOCK_N": _block(samples), "BLOCK_F": _block(out_features, 32), "BLOCK_E": _block(in_features)}
        if tma:
            _launch_tma(TMA_GRAD_STACK, stack_grid,
                        {"grad_pa_desc": _descriptor(grad_pa), "grad_pb_desc": _descriptor(grad_pb),
                         "weight_a_desc": _descriptor(_stacked(weight_a)),
                         "weight_b_desc": _descriptor(_stacked(weight_b)), "order_ptr": order, "offsets_ptr": offsets,
                         "grad_ha_desc": _descriptor(grad_ha), "grad_hb_desc": _descriptor(grad_hb),
                         "num_pairs": num_pairs, "layers_a": layers_a, "samples": samples,
                         "in_features": in_features, "out_features": out_features},
                        stack_blocks, PER_PAIR=per_pair, DOT_FP32=dot_fp32)
        else:
            _launch(GRAD_STACK, stack_grid,
                    (grad_pa, grad_pb, weight_a, weight_b, order, offsets, grad_ha, grad_hb,
                     num_pairs, layers_a, samples, in_features, out_features),
                    stack_blocks, PER_PAIR=per_pair, DOT_FP32=dot_fp32)

        # The TMA kernel splits a shared weight's pairs over TMA_SPLITS programs per tile.
        slots = num_pairs if per_pair else 1
        splits = min(TMA_SPLITS, num_pairs) if tma and not per_pair else 1

        def weight_grid(meta):
            return (slots * splits, triton.cdiv(out_features, meta["BLOCK_F"]),
                    triton.cdiv(in_features, meta["BLOCK_E"]))

        weight_blocks = {"BLOCK_N": _block(samples, 32), "BLOCK_F": _block(out_features),
                         "BLOCK_E": _block(in_features)}
        launches = [(grad_weight_a, grad_pa, ha, 0)] + ([] if shared else [(grad_weight_b, grad_pb, hb, 1)])
        for grad_weight, grad_first, stack_first, column in launches:
            if tma:
                out = grad_weight if splits == 1 else grad_weight.new_empty((splits, out_features, in_features),
                                                                             dtype=torch.float32)
                _launch_tma(TMA_GRAD_WEIGHT, weight_grid,
                            {"grad_first_desc": _descriptor(grad_first), "stack_first_desc": _descriptor(stack_first),
                             "grad_second_desc": _descriptor(grad_pb), "stack_second_desc": _descriptor(hb),
                             "pairs_ptr": pairs, "out_ptr": out, "first_column": column, "num_pairs": num_pairs,
                             "splits": splits, "samples": samples, "in_features": in_features,
                             "out_features": out_features},
                            weight_blocks, PER_PAIR=per_pair, HAS_SECOND=shared, DOT_FP32=dot_fp32)
                if splits > 1:
                    grad_weight.copy_(out.sum(0))  # the partials in order: the same bits on every run
            else:
                _launch(GRAD_WEIGHT, weight_grid,
                        (grad_first, stack_first, grad_pb, hb, pairs, grad_weight, column,
                         num_pairs, samples, in_features, out_features),
                        weight_blocks, PER_PAIR=per_pair, HAS_SECOND=shared, DOT_FP32=dot_fp32)

    # Bias gradients: fixed-shape sums over rows (and pairs), deterministic on CPU and GPU.
    reduce_dims = (1,) if per_pair else (0, 1)
    sum_a = grad_pa.float().sum(reduce_dims)
    sum_b = grad_pb.float().sum(reduce_dims)
    grad_bias_a = absent() if bias_a is None else (sum_a + sum_b if shared else sum_a).to(ha.dtype)
    grad_bias_b = absent() if bias_b is None else sum_b.to(ha.dtype)
    return grad_ha, grad_hb, grad_weight_a, grad_bias_a, grad_weight_b, grad_bias_b

