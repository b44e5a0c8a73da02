"""pytest-benchmark timings of `guidance_attention` on the CPU, on the workloads of
stepfusion_kernels/bench/guidance_attention.py. Run: python -m pytest benchmarks/bench_guidance_attention.py"""

import pytest

from stepfusion_kernels.bench._harness import EAGER, FORWARD, FORWARD_BACKWARD, make_runner
from stepfusion_kernels.bench.guidance_attention import cases

CASES = cases("cpu")
CONTENDERS = [EAGER, "sdpa", "cpu"]


@pytest.mark.parametrize("mode", [FORWARD, FORWARD_BACKWARD])
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.label.replace(" ", "-"))
def test_guidance_attention(benchmark, case, contender, mode):
    if contender not in case.contenders:
        pytest.skip(f"{contender} is not a contender here (the extension is not built, or L is too long)")
    benchmark.group = f"guidance_attention {case.label} {mode}"
    benchmark(make_runner(case, contender, mode))
