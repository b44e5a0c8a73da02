"""Times skew_pair_project's CUDA backend under each setting of its cuBLASLt path against one dense cuBLAS
GEMM of equal FLOPs measured in the same run (the benchmark's SSFN shapes and harness), and measures the
host time of one call: the measurements behind the defaults of

    STEPFUSION_SKEW_FORWARD=strided    evenly stepping forward sides as one strided batch, bias in the epilogue
    STEPFUSION_SKEW_FORWARD=pairs      one GEMM per pair and side, bias in the epilogue
    STEPFUSION_SKEW_WEIGHT_GROUPS=G    a shared weight's gradient summed in G float32 partials ("auto" or an int)

and, for comparison, the backend's own grouped GEMM kernel (STEPFUSION_SKEW_BLASLT=0).

Each setting runs in a process of its own, so that one cuBLASLt mishandles (an illegal address ends the
process's CUDA context) costs only its own rows. GPU only.
Usage: python scripts/tune_skew_cuda.py [--out DIR] [--dtypes bfloat16 [float32]] [--profile]
"""

import argparse
import csv
import os
import subprocess
import sys
import time

import torch

from stepfusion_kernels.bench import skew_pair_project as bench
from stepfusion_kernels.bench._harness import run_cases, write_csv
from stepfusion_kernels.ops.skew_pair_project import skew_pair_project

SETTINGS = {
    "default": {},
    "forward-strided": {"STEPFUSION_SKEW_FORWARD": "strided"},
    "forward-pairs": {"STEPFUSION_SKEW_FORWARD": "pairs"},
    "groups-auto": {"STEPFUSION_SKEW_WEIGHT_GROUPS": "auto"},  # 3 groups for F 2304, E 768 on 132 SMs
    "groups-6": {"STEPFUSION_SKEW_WEIGHT_GROUPS": "6"},
    "groups-12": {"STEPFUSION_SKEW_WEIGHT_GROUPS": "12"},
    "strided+groups-auto": {"STEPFUSION_SKEW_FORWARD": "strided", "STEPFUSION_SKEW_WEIGHT_GROUPS": "auto"},
    "pairs+groups-auto": {"STEPFUSION_SKEW_FORWARD": "pairs", "STEPFUSION_SKEW_WEIGHT_GROUPS": "auto"},
    "own-kernel": {"STEPFUSION_SKEW_BLASLT": "0"},
}
VARIABLES = sorted({name for setting in SETTINGS.values() for name in setting})


def apply(setting):
    """Sets the environment for one setting (the C++ op reads it at every call)."""
    for name in VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(SETTINGS[setting])


def gpu_rows(setting, dtypes):
    """The CUDA backend's rows under `setting`, labelled `cuda[setting]`, and with "default" the dense GEMM's."""
    apply(setting)
    keep = ("cuda", bench.DENSE) if setting == "default" else ("cuda",)
    cases = [case for case in bench.cases("cuda") if str(case.dtype).replace("torch.", "") in dtypes]
    for case in cases:
        case.contenders = {name: fn for name, fn in case.contenders.items() if name in keep}
        case.peak_memory = False
    rows = run_cases(cases)
    for row in rows:
        if row.contender == "cuda":
            row.contender = f"cuda[{setting}]"
    return rows


def versus_dense(rows):
    """One line per (shape, dtype, mode, setting) of the csv rows: ms and the dense GEMM's time over ours."""
    dense = {(r["label"], r["dtype"], r["mode"]): float(r["ms"]) for r in rows if r["contender"] == bench.DENSE}
    lines = ["| shape | dtype | mode | contender | ms | x dense GEMM |", "|---|---|---|---|---|---|"]
    for row in rows:
        key = (row["label"], row["dtype"], row["mode"])
        if row["contender"] != bench.DENSE and key in dense:
            ms = float(row["ms"])
            lines.append(f"| {row['label']} | {row['dtype']} | {row['mode']} | {row['contender']} | {ms:.3g} | "
                         f"{dense[key] / ms:.2f}x |")
    return "\n".join(lines)


def host_time_us(samples=16, num_pairs=1, calls=200, profile=False):
    """Microseconds of host time per forward and per forward+backward call at a tiny shape (the GPU work
    is far shorter than the host's, so back-to-back calls measure the host), with an optional CPU profile."""
    inputs = bench._inputs(samples, 768, 2304, num_pairs, "cuda", torch.bfloat16)()
    args = (inputs["ha"], inputs["hb"], inputs["pairs_host"], inputs["weight"], inputs["bias"])

    def forward():
        with torch.no_grad():
            skew_pair_project(*args, backend="cuda")

    def forward_backward():
        pa, pb = skew_pair_project(*args, backend="cuda")
        torch.autograd.backward((pa, pb), (torch.ones_like(pa), torch.ones_like(pb)))

    result = {}
    for name, call in (("forward", forward), ("forward+backward", forward_backward)):
        for _ in range(10):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        result[name] = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as profiler

            with profiler(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    call()
            print(f"CPU profile of 20 {name} calls:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return result


def measure(setting, options):
    """One setting, in this process: its host time per call, then its rows in OUT/rows-SETTING.csv."""
    apply(setting)
    times = host_time_us(profile=options.profile and setting == "default")
    print(f"host time per call, N16 P1 bf16, {setting}: "
          + ", ".join(f"{mode} {us:.0f} us" for mode, us in times.items()), flush=True)
    write_csv(gpu_rows(setting, options.dtypes), os.path.join(options.out, f"rows-{setting}.csv"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tune-skew-cuda")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], help="bfloat16 (the goal's gap), float32")
    parser.add_argument("--profile", action="store_true", help="print a CPU profile of the small calls")
    parser.add_argument("--only", choices=list(SETTINGS), help="measure one setting in this process")
    options = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_skew_cuda.py needs a CUDA GPU")
    os.makedirs(options.out, exist_ok=True)
    if options.only:
        measure(options.only, options)
        return

    rows, failed = [], []
    for setting in SETTINGS:
        command = [sys.executable, __file__, "--only", setting, "--out", options.out, "--dtypes", *options.dtypes]
        if subprocess.run(command + (["--profile"] if options.profile else [])).returncode != 0:
            failed.append(setting)
            continue
        with open(os.path.join(options.out, f"rows-{setting}.csv"), newline="") as handle:
            rows.extend(csv.DictReader(handle))
    table = versus_dense(rows)
    if failed:
        table += "\n\nfailed (see the log above): " + ", ".join(failed)
    with open(os.path.join(options.out, "tune_skew_cuda.md"), "w") as handle:
        handle.write(table + "\n")
    print(table)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
