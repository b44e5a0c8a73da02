"""Experimental TMA (tensor-descriptor) Triton kernels of skew_pair_project, timed against the package's
Triton backend, F.linear of equal FLOPs and a plain dense Triton TMA GEMM (Triton's own ceiling on the
GPU). Not used by the package yet: benchmarks/results/h100-2026-11-23.md has what they reached on an H100
(forward 525 TFLOP/s against 318 for the package's kernel). GPU only, bf16, SSFN shapes, shared weight
and bias. Usage: python scripts/skew_triton_tma.py [--check]   (--check: a small shape under
TRITON_INTERPRET=1 on the CPU, comparing every kernel with the reference)

- forward:  persistent; each tile makes 2-D descriptors over its layer (N, E), its weight (F, E) and its
            output (N, F) in the kernel, so one main loop serves both sides and every edge is clipped.
- d_h:      one program per (layer slot, row tile, column tile); 3-D host descriptors; the two sides are
            two branches (the compiler shares their shared memory).
- d_weight: SPLITS programs per output tile sum every SPLITS-th pair into fp32 partials, added in order.
"""

import os
import sys

if "--check" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

import python_ref  # noqa: E402
import stepfusion_kernels as sk  # noqa: E402
from stepfusion_kernels.triton.skew_pair_project import _layer_segments  # noqa: E402


def _scratch(size, alignment, stream):  # in-kernel descriptors live in global scratch memory
    return torch.empty(size, device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.int8)


triton.set_allocator(_scratch)


# The interpreter's bf16 dot is unreliable: there (--check) every operand goes to fp32 first.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _operand(tile, FP32: tl.constexpr):
    return tile.to(tl.float32) if FP32 else tile


@triton.jit
def _matrix(base, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    return tl.make_tensor_descriptor(base, shape=[rows, cols], strides=[cols, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_COLS])


@triton.jit
def forward_kernel(ha_ptr, hb_ptr, pairs_ptr, weight_ptr, bias_ptr, pa_ptr, pb_ptr, samples, in_features,
                   out_features, tasks, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, FP32: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    row_tiles = tl.cdiv(samples, BLOCK_N)
    tiles = row_tiles * tl.cdiv(out_features, BLOCK_F)
    w_desc = _matrix(weight_ptr, out_features, in_features, BLOCK_F, BLOCK_E)
    for program in tl.range(tl.program_id(0), tasks * tiles, NUM_SMS, flatten=FLATTEN):
        task = program // tiles  # 2 k + side
        tile = program % tiles
        pair = (task // 2).to(tl.int64)
        layer = tl.load(pairs_ptr + task)
        if task % 2 == 0:
            x_ptr = ha_ptr
            out_ptr = pa_ptr
        else:
            x_ptr = hb_ptr
            out_ptr = pb_ptr
        x_desc = _matrix(x_ptr + layer * samples * in_features, samples, in_features, BLOCK_N, BLOCK_E)
        out_desc = _matrix(out_ptr + pair * samples * out_features, samples, out_features, BLOCK_N, BLOCK_F)
        row = (tile % row_tiles) * BLOCK_N
        col = (tile // row_tiles) * BLOCK_F
        acc = tl.zeros((BLOCK_N, BLOCK_F), dtype=tl.float32)
        for e in range(0, in_features, BLOCK_E):
            acc = tl.dot(_operand(x_desc.load([row, e]), FP32), _operand(w_desc.load([col, e]), FP32).T, acc)
        cols = col + tl.arange(0, BLOCK_F)
        acc += tl.load(bias_ptr + cols, mask=cols < out_features).to(tl.float32)[None, :]
        out_desc.store([row, col], acc.to(out_ptr.dtype.element_ty))


@triton.jit
def grad_stack_kernel(grad_a_desc, grad_b_desc, weight_desc, order_ptr, offsets_ptr, grad_ha_desc, grad_hb_desc,
                      num_pairs, layers_a, samples, in_features, out_features, FP32: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    row_tiles = tl.cdiv(samples, BLOCK_N)
    tiles = row_tiles * tl.cdiv(in_features, BLOCK_E)
    slot = tl.program_id(0) // tiles
    tile = tl.program_id(0) % tiles
    row = (tile % row_tiles) * BLOCK_N
    col = (tile // row_tiles) * BLOCK_E
    acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    begin = tl.load(offsets_ptr + slot)
    end = tl.load(offsets_ptr + slot + 1)
    if slot < layers_a:
        for position in range(begin, end):
            pair = tl.load(order_ptr + position).to(tl.int32)
            for f in range(0, out_features, BLOCK_F):
                g = _operand(grad_a_desc.load([pair, row, f]).reshape(BLOCK_N, BLOCK_F), FP32)
                acc = tl.dot(g, _operand(weight_desc.load([f, col]), FP32), acc)
        grad_ha_desc.store([slot, row, col], acc.to(grad_ha_desc.dtype).reshape(1, BLOCK_N, BLOCK_E))
    else:
        for position in range(begin, end):
            pair = tl.load(order_ptr + position).to(tl.int32) - num_pairs
            for f in range(0, out_features, BLOCK_F):
                g = _operand(grad_b_desc.load([pair, row, f]).reshape(BLOCK_N, BLOCK_F), FP32)
                acc = tl.dot(g, _operand(weight_desc.load([f, col]), FP32), acc)
        grad_hb_desc.store([slot - layers_a, row, col], acc.to(grad_hb_desc.dtype).reshape(1, BLOCK_N, BLOCK_E))


@triton.jit
def _add_side(acc, grad_desc, stack_desc, layer, pair, samples, f0, e0, FP32: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    for n in range(0, samples, BLOCK_N):
        g = _operand(grad_desc.load([pair, n, f0]).reshape(BLOCK_N, BLOCK_F), FP32)
        x = _operand(stack_desc.load([layer, n, e0]).reshape(BLOCK_N, BLOCK_E), FP32)
        acc = tl.dot(g.T, x, acc)
    return acc


@triton.jit
def grad_weight_kernel(grad_a_desc, ha_desc, grad_b_desc, hb_desc, pairs_ptr, partial_ptr, num_pairs, samples,
                       in_features, out_features, SPLITS: tl.constexpr, FP32: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    split = tl.program_id(0)
    f0 = tl.program_id(1) * BLOCK_F
    e0 = tl.program_id(2) * BLOCK_E
    acc = tl.zeros((BLOCK_F, BLOCK_E), dtype=tl.float32)
    for pair in range(split, num_pairs, SPLITS):
        acc = _add_side(acc, grad_a_desc, ha_desc, tl.load(pairs_ptr + pair * 2).to(tl.int32), pair, samples,
                        f0, e0, FP32, BLOCK_N, BLOCK_F, BLOCK_E)
        acc = _add_side(acc, grad_b_desc, hb_desc, tl.load(pairs_ptr + pair * 2 + 1).to(tl.int32), pair, samples,
                        f0, e0, FP32, BLOCK_N, BLOCK_F, BLOCK_E)
    f = f0 + tl.arange(0, BLOCK_F)
    e = e0 + tl.arange(0, BLOCK_E)
    out = partial_ptr + (split * out_features + f[:, None]) * in_features + e[None, :]
    tl.store(out, acc, mask=(f[:, None] < out_features) & (e[None, :] < in_features))


@triton.jit
def dense_kernel(a_desc, b_desc, c_desc, bias_ptr, rows, cols, depth, NUM_SMS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row_tiles = tl.cdiv(rows, BLOCK_M)
    for tile in tl.range(tl.program_id(0), row_tiles * tl.cdiv(cols, BLOCK_N), NUM_SMS, flatten=True):
        m = (tile % row_tiles) * BLOCK_M
        n = (tile // row_tiles) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, depth, BLOCK_K):
            acc = tl.dot(a_desc.load([m, k]), b_desc.load([n, k]).T, acc)
        offsets = n + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + offsets, mask=offsets < cols).to(tl.float32)[None, :]
        c_desc.store([m, n], acc.to(c_desc.dtype))


def _sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def forward(ha, hb, pairs, weight, bias, tile=(128, 256, 64, 8, 3), flatten=False):
    rows, cols, depth, warps, stages = tile
    num_pairs, samples, in_features, out_features = pairs.shape[0], ha.shape[1], ha.shape[2], weight.shape[0]
    pa = ha.new_empty(num_pairs, samples, out_features)
    pb = ha.new_empty(num_pairs, samples, out_features)
    tiles = 2 * num_pairs * triton.cdiv(samples, rows) * triton.cdiv(out_features, cols)
    sms = _sms(ha.device)
    forward_kernel[(min(sms, tiles),)](ha, hb, pairs, weight, bias, pa, pb, samples, in_features, out_features,
                                       2 * num_pairs, NUM_SMS=sms, FLATTEN=flatten, FP32=INTERPRETED,
                                       BLOCK_N=rows, BLOCK_F=cols, BLOCK_E=depth, num_warps=warps,
                                       num_stages=stages)
    return pa, pb


def grad_stack(grad_pa, grad_pb, weight, pairs, layers_a, layers_b, tile=(128, 256, 64, 8, 3)):
    rows, cols, depth, warps, stages = tile
    num_pairs, samples, out_features = grad_pa.shape
    in_features = weight.shape[1]
    order, offsets = _layer_segments(pairs, layers_a, layers_b)
    grad_ha = grad_pa.new_empty(layers_a, samples, in_features)
    grad_hb = grad_pa.new_empty(layers_b, samples, in_features)
    grid = ((layers_a + layers_b) * triton.cdiv(samples, rows) * triton.cdiv(in_features, cols),)
    grad_stack_kernel[grid](
        TensorDescriptor.from_tensor(grad_pa, [1, rows, depth]),
        TensorDescriptor.from_tensor(grad_pb, [1, rows, depth]),
        TensorDescriptor.from_tensor(weight, [depth, cols]), order, offsets,
        TensorDescriptor.from_tensor(grad_ha, [1, rows, cols]), TensorDescriptor.from_tensor(grad_hb, [1, rows, cols]),
        num_pairs, layers_a, samples, in_features, out_features, FP32=INTERPRETED, BLOCK_N=rows, BLOCK_F=depth,
        BLOCK_E=cols,
        num_warps=warps, num_stages=stages)
    return grad_ha, grad_hb


def grad_weight(grad_pa, grad_pb, ha, hb, pairs, splits=2, tile=(128, 256, 64, 8, 3)):
    rows, cols, depth, warps, stages = tile
    num_pairs, samples, out_features = grad_pa.shape
    in_features = ha.shape[2]
    partial = torch.empty(splits, out_features, in_features, device=ha.device, dtype=torch.float32)
    grid = (splits, triton.cdiv(out_features, rows), triton.cdiv(in_features, cols))
    grad_weight_kernel[grid](
        TensorDescriptor.from_tensor(grad_pa, [1, depth, rows]), TensorDescriptor.from_tensor(ha, [1, depth, cols]),
        TensorDescriptor.from_tensor(grad_pb, [1, depth, rows]), TensorDescriptor.from_tensor(hb, [1, depth, cols]),
        pairs, partial, num_pairs, samples, in_features, out_features, SPLITS=splits, FP32=INTERPRETED, BLOCK_N=depth,
        BLOCK_F=rows, BLOCK_E=cols, num_warps=warps, num_stages=stages)
    return partial.sum(0).to(ha.dtype)


def dense(rows_in, weight, bias, tile=(128, 256, 64, 8, 3)):
    block_m, block_n, block_k, warps, stages = tile
    out = rows_in.new_empty(rows_in.shape[0], weight.shape[0])
    sms = _sms(rows_in.device)
    tiles = triton.cdiv(out.shape[0], block_m) * triton.cdiv(out.shape[1], block_n)
    dense_kernel[(min(sms, tiles),)](
        TensorDescriptor.from_tensor(rows_in, [block_m, block_k]),
        TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        TensorDescriptor.from_tensor(out, [block_m, block_n]), bias, out.shape[0], out.shape[1], rows_in.shape[1],
        NUM_SMS=sms, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


def _inputs(layers, samples, in_features, out_features, num_pairs, device, dtype):
    ha = torch.randn(layers, samples, in_features, device=device, dtype=dtype)
    hb = torch.randn(layers, samples, in_features, device=device, dtype=dtype)
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype) * in_features ** -0.5
    bias = torch.randn(out_features, device=device, dtype=dtype)
    pairs = sk.skew_pairs(2 if num_pairs <= layers - 2 else 0, num_pairs, layers, layers).to(device)
    grads = [torch.randn(num_pairs, samples, out_features, device=device, dtype=dtype) for _ in range(2)]
    return ha, hb, pairs, weight, bias, grads


def check():
    """Every kernel against the fp64 reference on a small ragged shape (interpreter, one small tile)."""
    layers, samples, in_features, out_features, num_pairs = 5, 40, 48, 80, 3
    ha, hb, pairs, weight, bias, (grad_pa, grad_pb) = _inputs(layers, samples, in_features, out_features, num_pairs,
                                                              "cpu", torch.float32)
    tile = (16, 32, 16, 1, 1)
    args = [t.double().requires_grad_() for t in (ha, hb, weight, bias)]
    ra, rb = python_ref.skew_pair_project(args[0], args[1], pairs, args[2], args[3])
    torch.autograd.backward((ra, rb), (grad_pa.double(), grad_pb.double()))
    pa, pb = forward(ha, hb, pairs, weight, bias, tile)
    grad_ha, grad_hb = grad_stack(grad_pa, grad_pb, weight, pairs, layers, layers, (16, 16, 32, 1, 1))
    grad_w = grad_weight(grad_pa, grad_pb, ha, hb, pairs, 2, (32, 16, 16, 1, 1))
    for name, ours, expected in (("pa", pa, ra), ("pb", pb, rb), ("grad_ha", grad_ha, args[0].grad),
                                 ("grad_hb", grad_hb, args[1].grad), ("grad_weight", grad_w, args[2].grad)):
        torch.testing.assert_close(ours.double(), expected.detach(), rtol=1e-4, atol=1e-4)
        print(f"{name}: matches the reference")


def main():
    from triton.testing import do_bench

    torch.manual_seed(0)
    tiles = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4)]
    for samples, num_pairs in [(4096, 12), (256, 12), (4096, 1)]:
        layers, in_features, out_features = 12, 768, 2304
        ha, hb, pairs, weight, bias, (grad_pa, grad_pb) = _inputs(layers, samples, in_features, out_features,
                                                                  num_pairs, "cuda", torch.bfloat16)
        flops = 2 * num_pairs * 2 * samples * in_features * out_features
        rows = torch.randn(2 * num_pairs * samples, in_features, device="cuda", dtype=torch.bfloat16)

        def report(name, fn):
            ms = do_bench(fn)
            print(f"N{samples} P{num_pairs} {name:40s} {ms * 1e3:8.1f} us {flops / ms / 1e9:5.0f} TFLOP/s", flush=True)

        report("F.linear (cuBLAS), same FLOPs", lambda: F.linear(rows, weight, bias))
        report("package triton forward", lambda: sk.skew_pair_project(ha, hb, pairs, weight, bias, backend="triton"))
        expected = sk.skew_pair_project(ha, hb, pairs, weight, bias, backend="cuda")
        for tile in tiles:
            report(f"dense triton TMA {tile}", lambda: dense(rows, weight, bias, tile))
            for flatten in (False, True):
                pa, pb = forward(ha, hb, pairs, weight, bias, tile, flatten)
                torch.testing.assert_close(pa, expected[0], rtol=2e-2, atol=5e-2)
                report(f"TMA forward {tile} flatten={flatten}",
                       lambda: forward(ha, hb, pairs, weight, bias, tile, flatten))
            report(f"TMA d_h {tile}", lambda: grad_stack(grad_pa, grad_pb, weight, pairs, layers, layers, tile))
            report(f"TMA d_weight, 2 splits {tile}", lambda: grad_weight(grad_pa, grad_pb, ha, hb, pairs, 2, tile))


if __name__ == "__main__":
    check() if "--check" in sys.argv else main()
