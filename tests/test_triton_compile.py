"""Every Triton kernel compiles for an H100/H200 (sm_90) and an A100 (sm_80) at the settings a GPU run uses, on
this machine too: the other tests interpret the kernels (TRITON_INTERPRET=1, small tiles), which accepts code
that a GPU compile rejects. scripts/compile_triton.py does the compiling, in a process of its own because the
interpreter's setting holds for the life of a process."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "compile_triton.py")


@pytest.mark.parametrize("arch", [90, 80], ids=["sm90 (H100, H200)", "sm80 (A100)"])
def test_every_triton_kernel_compiles_within_its_registers_and_shared_memory(arch, tmp_path):
    table = tmp_path / "compiled.md"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))  # this checkout's package
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--arch", str(arch), "--out", str(table)], env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    lines = [line for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    columns = [name.strip() for name in lines[0].strip("|").split("|")]
    rows = [dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]
    kernels = {row["kernel"] for row in rows}
    # Every op's forward and backward kernels were compiled, and the TMA variants where the GPU has TMA.
    expected = ["_forward_kernel", "_backward_kernel", "_backward_key_kernel", "_backward_query_kernel",
                "_grad_stack_kernel", "_grad_weight_kernel", "_kl_forward_kernel", "_mse_forward_kernel",
                "_wide_forward_kernel", "_wide_backward_kernel", "_kl_wide_forward_kernel", "_mse_wide_forward_kernel"]
    tma = ["_tma_forward_kernel", "_tma_grad_stack_kernel", "_tma_grad_weight_kernel"]
    for kernel in expected + (tma if arch >= 90 else []):
        assert kernel in kernels, f"{kernel} was not compiled"
    assert arch >= 90 or not kernels & set(tma), "TMA kernels compiled for a GPU without TMA"
    # A launch with fixed settings keeps its registers: no spills at these ordinary widths (D and C 1000,
    # Dh 64), nor in the chunked kernels of wide rows (70001). An autotuner's config may spill a little; the
    # autotuner times it against the others.
    spilled = [row for row in rows if row["autotuned"] == "no" and row["stack (bytes)"] != "0"]
    assert not spilled, spilled
