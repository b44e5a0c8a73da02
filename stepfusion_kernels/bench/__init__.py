"""`stepfusion-bench`: benchmarks every op on whatever device is present, on default shapes; prints a
table and writes CSV, Markdown and a PNG plot to --out."""

import argparse
import os
import platform

import torch

from . import cohort_mutual_loss, guidance_attention, shift_expand, skew_pair_project
from ._harness import copy_bandwidth_gb_per_s, markdown_table, plot_speedups, run_cases, write_csv

# One line per op: the module whose cases(device) lists its workloads.
OPS = {"cohort_mutual_loss": cohort_mutual_loss, "guidance_attention": guidance_attention,
       "shift_expand": shift_expand, "skew_pair_project": skew_pair_project}


def describe_device(device):
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    versions = f"torch {torch.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    count = torch.get_num_threads()
    threads = "" if device == "cuda" else f", {count} thread{'' if count == 1 else 's'}"
    return f"{device}: {name}{threads}; {versions}"


def parser():
    top = argparse.ArgumentParser(prog="stepfusion-bench", description=__doc__)
    top.add_argument("--out", default="bench-results", help="directory for results.csv, results.md, speedups.png")
    top.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    top.add_argument("--ops", nargs="+", choices=sorted(OPS), default=sorted(OPS),
                     help="the ops to benchmark, in this order")
    return top


def main(argv=None):
    cli = parser()
    args = cli.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        cli.error("--device cuda: no CUDA device is available")

    from tqdm import tqdm

    cases = [case for op in args.ops for case in OPS[op].cases(device)]
    header = describe_device(device)
    print(header, flush=True)
    ceiling = copy_bandwidth_gb_per_s(device)
    print(f"measured copy bandwidth: {ceiling:.1f} GB/s", flush=True)
    os.makedirs(args.out, exist_ok=True)

    def write_tables(rows):
        write_csv(rows, os.path.join(args.out, "results.csv"))
        with open(os.path.join(args.out, "results.md"), "w") as handle:
            handle.write(f"{header}\n\nmeasured copy bandwidth: {ceiling:.1f} GB/s\n\n{markdown_table(rows)}\n")

    total = sum(len(case.modes) * len(case.contenders) for case in cases)
    with tqdm(total=total, desc="stepfusion-bench", unit="timing") as progress:
        rows = run_cases(cases, ceiling_gb_per_s=ceiling, progress=progress, after_case=write_tables)

    print(markdown_table(rows))
    plot_speedups(rows, os.path.join(args.out, "speedups.png"))
    print(f"wrote {args.out}/results.csv, results.md, speedups.png")
    return 0  # the exit status of the console script


