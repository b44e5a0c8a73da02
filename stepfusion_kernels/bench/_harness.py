"""The one benchmark harness: every op describes its workloads as `BenchCase`s; this module times every
contender of every case (CPU: torch.utils.benchmark, median; GPU: triton.testing.do_bench, median), and
reports ms, GB/s or TFLOP/s, % of the device's measured copy bandwidth, and speed-ups against the eager
reference ("eager") and torch.compile of the reference ("compile") measured in the same run."""

import csv
import dataclasses
import os
from typing import Callable, Optional

import torch
import torch._dynamo

# Each workload shape and grad mode of a compiled contender is a graph of its own; past dynamo's default
# limit of 8 a function silently falls back to eager (and FlexAttention to its unfused, dense path).
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

EAGER, COMPILE = "eager", "compile"
FORWARD, FORWARD_BACKWARD = "forward", "forward+backward"


@dataclasses.dataclass
class BenchCase:
    """One workload. `make_inputs()` returns fresh keyword arguments (float tensors that need gradients
    already require them); `contenders` maps a name to fn(**kwargs) -> Tensor or tuple of Tensors, and
    should include EAGER and COMPILE. `bytes_moved` / `flops` give, per mode, the minimum memory traffic or
    the useful floating-point operations, for GB/s and TFLOP/s."""

    op: str
    label: str
    device: str
    dtype: torch.dtype
    make_inputs: Callable[[], dict]
    contenders: dict
    modes: tuple = (FORWARD, FORWARD_BACKWARD)
    bytes_moved: dict = dataclasses.field(default_factory=dict)
    flops: dict = dataclasses.field(default_factory=dict)
    peak_memory: bool = False  # also report the peak memory allocated during one call


@dataclasses.dataclass
class Row:
    op: str
    label: str
    device: str
    dtype: str
    mode: str
    contender: str
    ms: float
    gb_per_s: Optional[float] = None
    tflop_per_s: Optional[float] = None
    percent_of_copy: Optional[float] = None
    vs_eager: Optional[float] = None
    vs_compile: Optional[float] = None
    peak_mib: Optional[float] = None


def _outputs(value):
    return value if isinstance(value, tuple) else (value,)


def make_runner(case, contender, mode):
    """A no-argument callable running one contender once in `mode` (inputs and upstream grads made once)."""
    fn = case.contenders[contender]
    kwargs = case.make_inputs()
    if mode == FORWARD:
        def run_forward():
            with torch.no_grad():
                return fn(**kwargs)

        return run_forward
    sources = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    probe = _outputs(fn(**kwargs))
    upstream = [torch.randn_like(out) for out in probe if out.requires_grad]

    def run_forward_backward():
        outputs = [out for out in _outputs(fn(**kwargs)) if out.requires_grad]
        return torch.autograd.grad(outputs, sources, upstream, allow_unused=True)

    return run_forward_backward


def time_ms(runner, device):
    """Median milliseconds of one call, after warm-up (which also triggers torch.compile)."""
    for _ in range(3):
        runner()
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(runner, warmup=25, rep=100, return_mode="median")
    import torch.utils.benchmark as benchmark

    # Timer runs on one thread unless told otherwise; the report names torch.get_num_threads().
    timer = benchmark.Timer(stmt="runner()", globals={"runner": runner}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.5).median * 1e3


def peak_memory_mib(runner, device):
    """Peak bytes allocated during one call above what was allocated before (CUDA allocator or, on the CPU,
    torch's profiler memory accounting)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        runner()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    # Kineto logs every profiler start and stop, and on a machine without a GPU an ERROR about the GPU count;
    # here the profiler only counts bytes. A user's own KINETO_LOG_LEVEL is kept.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner()
    # The allocator's events (bytes > 0 allocated, < 0 freed) in time order; prof.events() lists only
    # the frees as "[memory]" events, the raw kineto results hold both.
    current = peak = 0
    memory_events = [e for e in prof.profiler.kineto_results.events() if e.nbytes() != 0]
    for event in sorted(memory_events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def copy_bandwidth_gb_per_s(device, megabytes=512):
    """The device's measured copy bandwidth (read + write bytes per second of a large clone)."""
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), device)
    return 2 * source.numel() * 4 / (ms * 1e-3) / 1e9


def run_cases(cases, ceiling_gb_per_s=None, progress=None, after_case=None):
    """Times every contender of every case in every mode; returns the rows. `after_case(rows)` is called
    with the rows so far after each case (to keep partial results of a run that is cut short)."""
    rows = []
    for case in cases:
        for mode in case.modes:
            measured = {}
            for contender in case.contenders:
                runner = make_runner(case, contender, mode)
                ms = time_ms(runner, case.device)
                row = Row(case.op, case.label, case.device, str(case.dtype).replace("torch.", ""), mode, contender, ms)
                if mode in case.bytes_moved:
                    row.gb_per_s = case.bytes_moved[mode] / (ms * 1e-3) / 1e9
                    if ceiling_gb_per_s:
                        row.percent_of_copy = 100 * row.gb_per_s / ceiling_gb_per_s
                if mode in case.flops:
                    row.tflop_per_s = case.flops[mode] / (ms * 1e-3) / 1e12
                if case.peak_memory:
                    row.peak_mib = peak_memory_mib(runner, case.device)
                measured[contender] = row
                rows.append(row)
                if progress is not None:
                    progress.update(1)
            for row in measured.values():
                if EAGER in measured:
                    row.vs_eager = measured[EAGER].ms / row.ms
                if COMPILE in measured:
                    row.vs_compile = measured[COMPILE].ms / row.ms
        if after_case is not None:
            after_case(rows)
    return rows


COLUMNS = [("op", "op"), ("label", "shape"), ("dtype", "dtype"), ("mode", "mode"), ("contender", "contender"),
           ("ms", "ms"), ("gb_per_s", "GB/s"), ("tflop_per_s", "TFLOP/s"), ("percent_of_copy", "% copy BW"),
           ("vs_eager", "x eager"), ("vs_compile", "x compile"), ("peak_mib", "peak MiB")]


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows):
    used = [(key, title) for key, title in COLUMNS if any(getattr(r, key) is not None for r in rows)]
    lines = ["| " + " | ".join(title for _, title in used) + " |", "|" + "---|" * len(used)]
    lines += ["| " + " | ".join(_cell(getattr(r, key)) for key, _ in used) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows, path):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([key for key, _ in COLUMNS])
        for row in rows:
            writer.writerow([getattr(row, key) for key, _ in COLUMNS])


def plot_speedups(rows, path):
    """One panel per op: every contender's speed-up over the eager reference, per shape and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r.op for r in rows))
    figure, axes = plt.subplots(len(ops), 1, figsize=(11, 3.6 * len(ops)), squeeze=False)
    for axis, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rows if r.op == op and r.vs_eager is not None]
        groups = list(dict.fromkeys((r.label, r.dtype, r.mode) for r in op_rows))
        contenders = list(dict.fromkeys(r.contender for r in op_rows))
        width = 0.8 / max(len(contenders), 1)
        for index, contender in enumerate(contenders):
            values = [next((r.vs_eager for r in op_rows
                            if (r.label, r.dtype, r.mode) == g and r.contender == contender), 0.0) for g in groups]
            axis.bar([g + index * width for g in range(len(groups))], values, width, label=contender)
        axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        crowded = len(groups) > 8  # slanted labels, or they run into each other
        axis.set_xticklabels([f"{label}\n{dtype} {mode}" for label, dtype, mode in groups], fontsize=7,
                             rotation=25 if crowded else 0, ha="right" if crowded else "center")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_ylabel("speed-up over eager")
        axis.set_title(f"{op} ({op_rows[0].device if op_rows else ''})")
        axis.legend(fontsize=7, ncol=len(contenders))
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
