"""The benchmark harness (`stepfusion-bench`, benchmarks/): every contender of every op's workloads computes
what the eager reference computes, values and gradients, so that the tables compare like with like; the
ratios, rates and files come out as the harness says. Nothing is timed here: the timer is replaced by fixed
numbers (speed goals live in benchmarks/, not in tests)."""

import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.utils.benchmark as benchmark

import stepfusion_kernels.bench as bench
from harness import NEEDS_GPU, TOLERANCE, as_tuple, relative_error
from stepfusion_kernels.bench import _harness
from stepfusion_kernels.bench import cohort_mutual_loss, guidance_attention, shift_expand, skew_pair_project
from stepfusion_kernels.bench._harness import COMPILE, EAGER, FORWARD, FORWARD_BACKWARD, BenchCase

# Small workloads of each op, in the form of its SHAPES entries; odd sizes where the op allows them.
TINY_SHAPES = {
    shift_expand: [(2, 17, 33)],
    guidance_attention: [(1, 2, 129, 3)],               # batch, heads, length, window (Dh 64, G 16 fixed)
    skew_pair_project: [(5, 16, 24, 3)],                # N, E, F, P over 12 layers
    cohort_mutual_loss: [(3, 5, 7, "kl"), (3, 5, 7, "mse")],
}
# Contenders that compute something else on purpose: the dense GEMM of equal FLOPs (a ceiling, not the op).
NOT_THE_OP = {skew_pair_project.DENSE}


def _limit(dtype):
    # Both sides round: twice the harness's tolerance against float64, and float32's loosest (attention's).
    return 1e-4 if dtype == torch.float32 else 2 * TOLERANCE[dtype]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_GPU)])
@pytest.mark.parametrize("workloads", TINY_SHAPES, ids=lambda module: module.__name__.rsplit(".", 1)[1])
def test_every_contender_computes_what_the_eager_reference_does(workloads, device):
    for case in workloads.cases(device, shapes=TINY_SHAPES[workloads]):
        ours = ("cpu",) if device == "cpu" else ("cuda", "triton")
        assert {EAGER, COMPILE} <= set(case.contenders) and set(ours) & set(case.contenders), case.contenders
        torch.manual_seed(0)
        kwargs = case.make_inputs()
        sources = [value for value in kwargs.values() if isinstance(value, torch.Tensor) and value.requires_grad]
        expected = as_tuple(case.contenders[EAGER](**kwargs))
        upstream = [torch.randn_like(out) for out in expected]
        expected_grads = torch.autograd.grad(expected, sources, upstream, allow_unused=True)
        for name, contender in case.contenders.items():
            if name in NOT_THE_OP:
                continue
            outputs = as_tuple(contender(**kwargs))
            assert len(outputs) == len(expected), (case.label, name)
            for out, ref in zip(outputs, expected):
                assert relative_error(out, ref.float().cpu()) < _limit(case.dtype), (case.label, case.dtype, name)
            grads = torch.autograd.grad(outputs, sources, upstream, allow_unused=True)
            for grad, ref in zip(grads, expected_grads):
                assert (grad is None) == (ref is None), (case.label, name)
                if ref is not None:
                    assert relative_error(grad, ref.float().cpu()) < _limit(case.dtype), \
                        (case.label, case.dtype, name, "gradient")


def test_run_cases_reports_rates_and_ratios_against_eager_and_compile(monkeypatch):
    def make_inputs():
        return {"x": torch.randn(4, 3, requires_grad=True)}

    case = BenchCase(op="toy", label="4x3", device="cpu", dtype=torch.float32, make_inputs=make_inputs,
                     contenders={EAGER: lambda x: x * 2, COMPILE: lambda x: x + x, "ours": lambda x: 2 * x},
                     bytes_moved={FORWARD: 1e9, FORWARD_BACKWARD: 3e9}, flops={FORWARD: 2e12}, peak_memory=True)
    times = {EAGER: 8.0, COMPILE: 4.0, "ours": 2.0}
    real_make_runner = _harness.make_runner

    def make_runner(case, contender, mode):
        runner = real_make_runner(case, contender, mode)
        runner.contender = contender
        return runner

    def time_ms(runner, device):  # the timer's stand-in: the runner runs once, its contender's ms come back
        runner()
        return times[runner.contender]

    monkeypatch.setattr(_harness, "make_runner", make_runner)
    monkeypatch.setattr(_harness, "time_ms", time_ms)
    seen = []
    rows = _harness.run_cases([case], ceiling_gb_per_s=1000.0, after_case=lambda rows: seen.append(len(rows)))
    assert seen == [6] and [(row.mode, row.contender) for row in rows] == [
        (mode, name) for mode in (FORWARD, FORWARD_BACKWARD) for name in times]
    for row in rows:
        ms = times[row.contender]
        assert row.ms == ms
        assert row.vs_eager == pytest.approx(8.0 / ms) and row.vs_compile == pytest.approx(4.0 / ms)
        moved = 1e9 if row.mode == FORWARD else 3e9
        assert row.gb_per_s == pytest.approx(moved / (ms * 1e-3) / 1e9)
        assert row.percent_of_copy == pytest.approx(100 * row.gb_per_s / 1000.0)
        assert row.tflop_per_s == (pytest.approx(2e12 / (ms * 1e-3) / 1e12) if row.mode == FORWARD else None)
        assert row.peak_mib is not None and row.peak_mib >= 0


def test_stepfusion_bench_writes_its_tables_and_plot(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(_harness, "time_ms", lambda runner, device: (runner(), 1.5)[1])
    monkeypatch.setattr(bench, "copy_bandwidth_gb_per_s", lambda device: 10.0)
    for workloads, shapes in TINY_SHAPES.items():
        monkeypatch.setitem(workloads.SHAPES, "cpu", shapes)
    out = tmp_path / "results"
    assert bench.main(["--out", str(out), "--device", "cpu", "--ops", "shift_expand", "cohort_mutual_loss"]) == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = [case for module in (shift_expand, cohort_mutual_loss) for case in module.cases("cpu")]
    assert len(rows) == sum(len(case.modes) * len(case.contenders) for case in expected)
    assert {row["op"] for row in rows} == {"shift_expand", "cohort_mutual_loss"}
    assert all(float(row["ms"]) == 1.5 and float(row["vs_eager"]) == 1.0 for row in rows)
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("cpu: ") and "measured copy bandwidth: 10.0 GB/s" in markdown
    assert markdown.count("\n| shift_expand |") == sum(row["op"] == "shift_expand" for row in rows)
    assert (out / "speedups.png").read_bytes().startswith(b"\x89PNG")
    assert "wrote " in capsys.readouterr().out


def test_cpu_timing_runs_on_the_threads_the_report_names(monkeypatch):
    """torch.utils.benchmark.Timer runs on one thread unless told; the report header names
    torch.get_num_threads(), so the timer must be given that number."""
    given = {}

    class Timer:
        def __init__(self, stmt, globals, num_threads=1):
            given["num_threads"] = num_threads

        def blocked_autorange(self, min_run_time):
            return type("Measurement", (), {"median": 0.002})()

    monkeypatch.setattr(benchmark, "Timer", Timer)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert _harness.time_ms(lambda: None, "cpu") == 2.0
    assert given["num_threads"] == 3
    assert ", 3 threads;" in bench.describe_device("cpu")


def test_cpu_peak_memory_prints_no_profiler_log():
    """The CPU peak memory comes from torch.profiler, whose log lines (and, without a GPU, an ERROR about the
    GPU count) would be printed among the tables; a fresh process shows the first profile's output."""
    script = ("import torch\nfrom stepfusion_kernels.bench._harness import peak_memory_mib\n"
              "print(peak_memory_mib(lambda: torch.ones(1 << 20), 'cpu'))\n")
    env = {key: value for key, value in os.environ.items() if key != "KINETO_LOG_LEVEL"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=root)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) >= 4.0  # the 4 MiB tensor
    assert "profiler_start" not in done.stderr and "ERROR" not in done.stderr, done.stderr
