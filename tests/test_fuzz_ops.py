"""scripts/fuzz_ops.py: a short run passes, and a kernel less accurate than the reference fails its round."""

import importlib.util
import os

import pytest

import python_ref
import stepfusion_kernels as sk
from harness import OpUnderTest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "fuzz_ops.py")


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif("cpu" not in sk.backends(), reason="the C++ extension was not built")
def test_a_short_run_passes(fuzz, capsys):
    assert fuzz.main(["--rounds", "12", "--seed", "2", "--backends", "cpu"]) == 0
    assert capsys.readouterr().out.strip().endswith("0 of 12 rounds failed (seed 2; backends cpu)")


def test_a_kernel_less_accurate_than_the_reference_fails_its_round(fuzz):
    def kernel(error):
        """shift_expand as a stand-in kernel backend: the reference, then off by `error` (relative)."""
        def fn(backend="auto", **kwargs):
            out = sk.shift_expand(**kwargs, backend="reference")
            return out if backend == "reference" else out * (1 + error)
        return {"shift_expand": (OpUnderTest(fn=fn, ref=python_ref.shift_expand), fuzz.OPS["shift_expand"][1])}

    for index in range(3):
        description, failures = fuzz.run_round(0, index, ["shift_expand"], ["cpu"], "cpu", op_table=kernel(0.0))
        assert description.startswith(f"round {index}: shift_expand ") and failures == []
        description, failures = fuzz.run_round(0, index, ["shift_expand"], ["cpu"], "cpu", op_table=kernel(0.05))
        assert [quantity for quantity, _, _ in failures][:1] == ["output 0"]
        assert all(error > 1e-2 and error > 4 * bar for _, error, bar in failures)
