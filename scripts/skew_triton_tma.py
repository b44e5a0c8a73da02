"""Times the Triton backend of skew_pair_project with its pointer kernels and with its TMA kernels
(STEPFUSION_SKEW_TRITON_TMA=1), against F.linear of equal FLOPs (cuBLAS) and a plain dense Triton TMA
GEMM (what Triton itself reaches on this GPU), on SSFN's shapes in bf16: the measurements behind the
choice of the Triton default. GPU only. Usage: python scripts/skew_triton_tma.py
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

import stepfusion_kernels as sk
from stepfusion_kernels.triton import skew_pair_project as kernels

TILES = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4)]


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


def dense(rows_in, weight, bias, tile):
    """rows_in @ weight.T + bias as one persistent Triton TMA GEMM."""
    block_m, block_n, block_k, warps, stages = tile
    out = rows_in.new_empty(rows_in.shape[0], weight.shape[0])
    sms = torch.cuda.get_device_properties(rows_in.device).multi_processor_count
    tiles = triton.cdiv(out.shape[0], block_m) * triton.cdiv(out.shape[1], block_n)
    dense_kernel[(min(sms, tiles),)](
        TensorDescriptor.from_tensor(rows_in, [block_m, block_k]),
        TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        TensorDescriptor.from_tensor(out, [block_m, block_n]), bias, out.shape[0], out.shape[1], rows_in.shape[1],
        NUM_SMS=sms, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


def main():
    torch.manual_seed(0)
    layers, in_features, out_features = 12, 768, 2304
    for samples, num_pairs in [(4096, 12), (256, 12), (4096, 1)]:
        def t(*shape, scale=1.0):
            return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16).requires_grad_()

        ha, hb = t(layers, samples, in_features), t(layers, samples, in_features)
        weight, bias = t(out_features, in_features, scale=in_features ** -0.5), t(out_features)
        pairs = sk.skew_pairs(2 if num_pairs <= layers - 2 else 0, num_pairs, layers, layers)  # on the CPU
        upstream = [torch.randn(num_pairs, samples, out_features, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2)]
        rows = torch.randn(2 * num_pairs * samples, in_features, device="cuda", dtype=torch.bfloat16)
        flops = 2 * num_pairs * 2 * samples * in_features * out_features

        def report(name, fn, passes=1):
            ms = do_bench(fn)
            print(f"N{samples} P{num_pairs} {name:44s} {ms * 1e3:9.1f} us {passes * flops / ms / 1e9:5.0f} TFLOP/s",
                  flush=True)

        def project():
            return sk.skew_pair_project(ha, hb, pairs, weight, bias, backend="triton")

        def project_and_backward():
            torch.autograd.backward(project(), upstream)

        with torch.no_grad():
            report("F.linear (cuBLAS), same FLOPs", lambda: F.linear(rows, weight, bias))
            for tile in TILES:
                report(f"dense Triton TMA GEMM {tile}", lambda: dense(rows, weight, bias, tile))
        for setting in ("0", "1"):
            os.environ[kernels.TMA_SETTING] = setting
            label = "TMA" if setting == "1" else "pointer"
            with torch.no_grad():
                report(f"triton backend, {label} kernels, forward", project)
            report(f"triton backend, {label} kernels, forward+backward", project_and_backward, passes=3)


if __name__ == "__main__":
    main()
