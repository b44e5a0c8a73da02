"""Time per call of every op at tiny shapes, where host work (argument checks, dispatch, autograd) is all
there is: forward without autograd, forward with autograd, and forward + backward (the outputs summed).

    python scripts/host_time.py                        # every usable backend on the CPU
    python scripts/host_time.py --device cuda --backends cuda triton

Each figure is the best of --repeats runs of --calls calls, in microseconds; on a GPU each run ends with a
synchronize, so a figure is the larger of host and GPU time per call. The best, not the benchmark harness's
median (stepfusion_kernels.bench): host time is what is measured here, and the minimum is the figure least
disturbed by the machine's other work (three alternated before/after runs with the harness's median
scattered by up to 1.9x on a 2-core machine, best-of-9 by 6%)."""

import argparse
import time

import torch

import stepfusion_kernels as sk


def workloads(device):
    """op name -> (function, keyword arguments) at tiny shapes, every optional argument present."""
    def leaf(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)

    batch, length, dim = 2, 8, 16
    return {
        "shift_expand": (sk.shift_expand, dict(
            x=leaf(batch, length, dim), scale_local=leaf(batch, length, dim), shift_local=leaf(batch, length, dim),
            scale_global=leaf(batch, dim), shift_global=leaf(batch, dim), gate=leaf(dim), weight=leaf(dim),
            bias=leaf(dim))),
        "guidance_attention": (sk.guidance_attention, dict(
            q=leaf(1, 2, 8, 16), k=leaf(1, 2, 8, 16), v=leaf(1, 2, 8, 16), k_global=leaf(1, 2, 2, 16),
            v_global=leaf(1, 2, 2, 16), window=2)),
        "skew_pair_project": (sk.skew_pair_project, dict(
            ha=leaf(12, 4, 16), hb=leaf(12, 4, 16), pairs=sk.skew_pairs(2, 1, 12, 12), weight_a=leaf(16, 16),
            bias_a=leaf(16))),
        "cohort_mutual_loss": (sk.cohort_mutual_loss, dict(
            outputs=leaf(4, 8, 5), teacher_weights=torch.rand(4, device=device))),
    }


def best_time_us(call, device, calls, repeats):
    for _ in range(calls // 10):
        call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backends", nargs="+", help="default: every usable backend for the device")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    usable = sk.backends()
    kernel_backends = ("cpu",) if args.device == "cpu" else ("cuda", "triton")  # no interpreted Triton
    chosen = args.backends or ["reference"] + [name for name in kernel_backends if name in usable]
    print(f"{'op':20s} {'backend':10s} {'no grad':>9s} {'forward':>9s} {'fwd+bwd':>9s}   (us per call)")
    for name, (op, kwargs) in workloads(args.device).items():
        for backend in chosen:
            def forward():
                outputs = op(**kwargs, backend=backend)
                return outputs if isinstance(outputs, tuple) else (outputs,)

            def forward_backward():
                sum(output.sum() for output in forward()).backward()

            with torch.no_grad():
                no_grad = best_time_us(forward, args.device, args.calls, args.repeats)
            times = [no_grad] + [best_time_us(call, args.device, args.calls, args.repeats)
                                 for call in (forward, forward_backward)]
            print(f"{name:20s} {backend:10s} " + " ".join(f"{t:9.1f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
