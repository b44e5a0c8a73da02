"""Times the Triton guidance_attention kernels over tile settings at one workload (default: the issue's goal
shape, B2 H8 L8192 window 128 G16 Dh64 bf16), forward and forward+backward, and checks every setting's
outputs and gradients against the current default. GPU only.

    python scripts/tune_guidance_triton.py                       # the goal shape, bfloat16
    python scripts/tune_guidance_triton.py --dtype float32 --head-dim 128 --configs 64,64,4,2 16,16,4,2"""

import argparse

import torch
import triton.testing

import stepfusion_kernels as sk
from stepfusion_kernels.triton import guidance_attention as kernels

CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 3), (64, 64, 2, 3), (128, 64, 8, 2),
           (64, 128, 4, 2), (128, 128, 8, 2), (32, 128, 4, 3), (128, 32, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3),
           (32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2)]  # the last four: float32's candidates


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("batch", 2), ("heads", 8), ("length", 8192), ("window", 128), ("globals", 16),
                          ("head-dim", 64)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--configs", nargs="+", metavar="M,N,WARPS,STAGES",
                        help="the settings to time besides the default (default: CONFIGS)")
    args = parser.parse_args()
    batch, heads, length, window, head_dim = args.batch, args.heads, args.length, args.window, args.head_dim
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    tensors = [torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype, requires_grad=True)
               for n in (length, length, length, args.globals, args.globals)]
    upstream = torch.randn(batch, heads, length, head_dim, device="cuda", dtype=dtype)

    def run():
        return sk.guidance_attention(*tensors, window=window, backend="triton")

    def run_backward():
        return torch.autograd.grad(run(), tensors, upstream)

    default = kernels._blocks(dtype, head_dim, torch.device("cuda"))
    reference = None
    print(f"{'BLOCK_M, BLOCK_N, warps, stages':34} {'fwd ms':>8} {'fwd+bwd ms':>11} {'max rel diff':>13}")
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs] if args.configs else CONFIGS
    for config in [default] + [c for c in configs if c != default]:
        kernels._blocks = lambda *_, config=config: config
        try:
            results = [run().detach()] + list(run_backward())
        except Exception as error:  # a setting that does not fit (shared memory) is reported, not fatal
            print(f"{str(config):34} failed: {type(error).__name__}: {str(error)[:80]}")
            continue
        if reference is None:
            reference = results
        diff = max(((r.float() - ref.float()).norm() / ref.float().norm()).item()
                   for r, ref in zip(results, reference))
        with torch.no_grad():
            forward_ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
        both_ms = triton.testing.do_bench(run_backward, warmup=25, rep=100, return_mode="median")
        print(f"{str(config):34} {forward_ms:8.3f} {both_ms:11.3f} {diff:13.2e}", flush=True)


if __name__ == "__main__":
    main()
