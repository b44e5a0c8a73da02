"""cohort_mutual_loss benchmarks. With pytest (CPU, pytest-benchmark):
    python -m pytest benchmarks/bench_cohort_mutual_loss.py
As a script, for whatever device is present (GPU: triton.testing.do_bench, median; prints the table):
    python benchmarks/bench_cohort_mutual_loss.py"""

import pytest
import torch

from stepfusion_kernels.bench import cohort_mutual_loss as workloads
from stepfusion_kernels.bench._harness import make_runner

CPU_CASES = [case for case in workloads.cases("cpu") if case.dtype == torch.float32]
PARAMS = [pytest.param(case, contender, mode, id=f"{case.label}-{mode}-{contender}")
          for case in CPU_CASES for mode in case.modes for contender in case.contenders]


@pytest.mark.parametrize(("case", "contender", "mode"), PARAMS)
def test_cohort_mutual_loss(benchmark, case, contender, mode):
    runner = make_runner(case, contender, mode)
    runner()  # warm-up: torch.compile compiles here, outside the timed rounds
    benchmark(runner)


if __name__ == "__main__":
    from stepfusion_kernels.bench import main

    main(["--ops", "cohort_mutual_loss"])
