"""Times the Triton shift_expand and cohort_mutual_loss kernels on wide rows, whole-row kernels against
chunked ones, to place the switch between them (stepfusion_kernels/triton/_common.py: FUSED_MAX, chosen
from compiled register use, not timed). At each width both run forward and forward+backward on the
same inputs, with the same number of elements in all, and the chunked results are checked against the
whole-row ones (exit status 1 past SPEC's tolerance for the dtype). GPU only.

    python scripts/time_wide_rows.py                              # D and C 2048 to 32768, bfloat16
    python scripts/time_wide_rows.py --dtype float32 --widths 4096 8192"""

import argparse
import sys

import torch
import triton.testing

import stepfusion_kernels as sk
from stepfusion_kernels.triton import _common

WIDTHS = (2048, 4096, 8192, 16384, 32768)  # 65536 is the widest block the whole-row kernels ever took
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # SPEC's relative error bounds


def workloads(width, elements, dtype):
    """(name, run) pairs: each run returns the op's output and the gradients of its inputs."""
    options = dict(device="cuda", dtype=dtype)
    rows = max(elements // width, 1)
    x, scale_local, shift_local = (torch.randn(1, rows, width, **options, requires_grad=True) for _ in range(3))
    scale_global, shift_global = (torch.randn(1, width, **options, requires_grad=True) for _ in range(2))
    gate, weight, bias = (torch.randn(width, **options, requires_grad=True) for _ in range(3))
    shift_inputs = (x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias)
    students = 8
    outputs = torch.randn(students, max(rows // students, 1), width, **options, requires_grad=True)
    teacher_weights = torch.rand(students, **options)

    def shift_expand():
        return sk.shift_expand(*shift_inputs, backend="triton")

    def cohort(kind):
        return lambda: sk.cohort_mutual_loss(outputs, teacher_weights, kind=kind, backend="triton")

    found = [(f"shift_expand B1 L{rows} D{width}", shift_expand, shift_inputs)]
    for kind in ("kl", "mse"):
        found.append((f"cohort_mutual_loss {kind} S{students} N{outputs.shape[1]} C{width}", cohort(kind),
                      (outputs,)))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=WIDTHS)
    parser.add_argument("--elements", type=int, default=1 << 26, help="elements per input tensor (default 2^26)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"FUSED_MAX = {_common.FUSED_MAX}, CHUNK = {_common.CHUNK}, {args.dtype}")
    print(f"{'workload':44} {'kernels':10} {'fwd ms':>8} {'fwd+bwd ms':>11} {'max rel diff':>13}")
    default_fused_max = _common.FUSED_MAX
    worst = 0.0
    for width in args.widths:
        torch.manual_seed(0)
        for name, run, inputs in workloads(width, args.elements, dtype):
            upstream = None
            reference = None
            for label, fused_max in (("whole row", 1 << 62), ("chunked", 0)):
                _common.FUSED_MAX = fused_max

                def run_backward():
                    return torch.autograd.grad(run(), inputs, upstream)

                output = run()
                upstream = torch.randn_like(output) if upstream is None else upstream
                results = [output.detach()] + list(run_backward())
                reference = results if reference is None else reference
                diff = max(((r.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
                           for r, ref in zip(results, reference))
                with torch.no_grad():
                    forward_ms = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
                both_ms = triton.testing.do_bench(run_backward, warmup=10, rep=50, return_mode="median")
                print(f"{name:44} {label:10} {forward_ms:8.3f} {both_ms:11.3f} {diff:13.2e}", flush=True)
                worst = max(worst, diff)
    _common.FUSED_MAX = default_fused_max
    if worst > TOLERANCE[dtype]:
        sys.exit(f"chunked and whole-row results differ by {worst:.2e} > {TOLERANCE[dtype]:g}")


if __name__ == "__main__":
    main()
