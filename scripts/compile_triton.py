"""Compiles every Triton kernel of the package for a GPU, on a machine without one, and reports what each
compiled kernel uses: registers, stack (register spills), shared memory.

    python scripts/compile_triton.py                 # sm_90 (H100/H200), every case
    python scripts/compile_triton.py --quick         # fewer dtypes and head dims: what the tests run
    python scripts/compile_triton.py --arch 80 --out compiled.md

The tests run every kernel on CPU tensors through Triton's interpreter, which takes code that a GPU compile
rejects and uses its own small tiles; this is the other half. Each op's Triton forward and backward are
called on CPU tensors at the settings a GPU run uses (dtypes, tiles, and every autotune config: the
autotuner "times" each config by compiling it), with Triton's driver replaced by one that names the target
GPU and never launches. Outputs are left unwritten. Exit status 1 when a kernel fails to compile or needs
more shared memory than the GPU has. Needs the Triton wheel's ptxas and cuobjdump (they ship with it);
TRITON_INTERPRET must be unset (it is removed here, before triton is imported)."""

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be compiled, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
import triton.backends.nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Shared memory one block may use (bytes), by compute capability: the opt-in maximum.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Compiled:
    kernel: str
    case: str
    settings: str
    autotuned: bool  # one of an autotuner's configs, which it times on a GPU; else the only settings of a launch
    registers: int
    stack: int
    shared: int


class CompileOnlyDriver:
    """A Triton driver for a GPU that is not there: it names the target, and its benchmarker runs each
    autotune config once (which compiles it) and reports the same time for all. The autotuner would take a
    config that fails to compile for a slow one and go on; `on_failure(error)` hears of it first."""

    def __init__(self, target, on_failure):
        self.target = target
        self.on_failure = on_failure

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def compile_each(call, quantiles=None, **_):
            try:
                call()
            except Exception as error:
                self.on_failure(error)
                raise
            return [1.0, 1.0, 1.0]
        return compile_each


def resource_usage(cubin):
    """(registers, stack bytes) of a cubin, from cuobjdump's resource report."""
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([tool, "-res-usage", file.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in report.splitlines() if "REG:" in line)
    fields = dict(field.split(":") for field in line.split() if ":" in field)
    return int(fields["REG"]), int(fields["STACK"])


class Recorder:
    """Compiles instead of launching (every JIT launch becomes a warmup) and records each compiled kernel;
    autotuners forget their choices, so that every case compiles every config."""

    def __init__(self, arch):
        self.arch = arch
        self.compiled = []
        self.failures = []  # (case, error)
        self.case = ""
        self.tuning = False

    def __enter__(self):
        recorder = self
        self.saved = (JITFunction.run, Autotuner.run, torch.cuda.get_device_capability)
        jit_run, autotuner_run, _ = self.saved

        def run(kernel, *args, grid, warmup, **kwargs):
            compiled = jit_run(kernel, *args, grid=grid, warmup=True, **kwargs)
            registers, stack = resource_usage(compiled.asm["cubin"])
            constants = {k: v for k, v in kwargs.items() if k.isupper() and not isinstance(v, bool)}
            flags = [k for k, v in kwargs.items() if k.isupper() and v is True]
            settings = " ".join([f"{k}={v}" for k, v in constants.items()] + flags
                                + [f"warps={compiled.metadata.num_warps}", f"stages={compiled.metadata.num_stages}"])
            record = Compiled(kernel.fn.__name__, recorder.case, settings, recorder.tuning, registers, stack,
                              compiled.metadata.shared)
            if record not in recorder.compiled:  # an autotuner compiles its choice twice: once to time it
                recorder.compiled.append(record)
            return compiled

        def tune(autotuner, *args, **kwargs):
            autotuner.cache.clear()
            recorder.tuning = True
            try:
                return autotuner_run(autotuner, *args, **kwargs)
            finally:
                recorder.tuning = False

        JITFunction.run = run
        Autotuner.run = tune
        torch.cuda.get_device_capability = lambda device=None: divmod(self.arch, 10)
        driver.set_active(CompileOnlyDriver(GPUTarget("cuda", self.arch, 32), self.fail))
        return self

    def fail(self, error):
        self.failures.append((self.case, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"))

    def __exit__(self, *_):
        JITFunction.run, Autotuner.run, torch.cuda.get_device_capability = self.saved
        driver.set_active(None)  # the next use finds the machine's own driver again, if it has one


def cases(quick):
    """(name, function) pairs; each function calls one op's Triton forward and backward on CPU tensors."""
    from stepfusion_kernels.triton import cohort_mutual_loss, guidance_attention, shift_expand, skew_pair_project

    dtypes = (torch.float32, torch.bfloat16) if quick else DTYPES

    def shift_case(dtype, dim, present):
        def run():
            x = torch.randn(2, 40, dim, dtype=dtype)
            local = x if present else None
            per_sample = torch.randn(2, dim, dtype=dtype) if present else None
            per_channel = torch.randn(dim, dtype=dtype) if present else None
            args = (local, local, per_sample, per_sample, per_channel, per_channel, per_channel)
            y, mean, rstd = shift_expand.forward(x, *args, 1e-5)
            shift_expand.backward(y, x, *args, mean, rstd)
        return run

    def guidance_case(dtype, head_dim, window):
        def run():
            q = torch.randn(1, 2, 200, head_dim, dtype=dtype)
            k = torch.randn(1, 2, 100, head_dim, dtype=dtype)
            kg = torch.randn(1, 2, 3, head_dim, dtype=dtype)
            out, lse = guidance_attention.forward(q, k, k, kg, kg, window, head_dim ** -0.5)
            guidance_attention.backward(out, q, k, k, kg, kg, out, lse, window, head_dim ** -0.5)
        return run

    def skew_case(dtype, per_pair, tma):
        def run():
            # Sizes that keep every autotune tile (none is pruned) and meet TMA's 16-byte alignment.
            layers, samples, width = 4, 256, 256
            ha, hb = torch.randn(layers, samples, width, dtype=dtype), torch.randn(layers, samples, width, dtype=dtype)
            pairs = torch.tensor([[0, 1], [2, 3], [3, 0]])
            weight = torch.randn(*((3,) if per_pair else ()), width, width, dtype=dtype)
            bias = torch.randn(*((3,) if per_pair else ()), width, dtype=dtype)
            os.environ[skew_pair_project.TMA_SETTING] = "1" if tma else "0"
            try:
                pa, pb = skew_pair_project.forward(ha, hb, pairs, weight, bias, None, None)
                skew_pair_project.backward(pa, pb, ha, hb, pairs, weight, bias, None, None)
                if not per_pair:  # separate weights: d_weight without the second stack
                    skew_pair_project.backward(pa, pb, ha, hb, pairs, weight, bias, weight, bias)
            finally:
                os.environ.pop(skew_pair_project.TMA_SETTING)
        return run

    def cohort_case(dtype, classes, kind):
        def run():
            outputs = torch.randn(4, 8, classes, dtype=dtype)
            penalty, mixture, lse = cohort_mutual_loss.forward(outputs, torch.rand(4), kind, 1.0)
            cohort_mutual_loss.backward(penalty, outputs, mixture, lse, kind)
        return run

    def name(dtype):
        return str(dtype).replace("torch.", "")

    found = []
    for dtype in dtypes:
        # 8192: the widest row held whole (FUSED_MAX); 70001: chunked.
        for dim in ((1000, 70001) if quick else (16, 1000, 8192, 70001)):
            for present in (True, False):
                found.append((f"shift_expand {name(dtype)} D={dim} {'all' if present else 'no'} optional arguments",
                              shift_case(dtype, dim, present)))
        for head_dim in ((64,) if quick else guidance_attention.HEAD_DIMS):
            for window in (8, -1):
                found.append((f"guidance_attention {name(dtype)} Dh={head_dim} window={window}",
                              guidance_case(dtype, head_dim, window)))
        for per_pair in (False, True):
            for tma in ((False, True) if dtype != torch.float32 else (False,)):
                found.append((f"skew_pair_project {name(dtype)} {'per-pair' if per_pair else 'shared'} weights"
                              f"{' TMA' if tma else ''}", skew_case(dtype, per_pair, tma)))
        for classes in ((1000, 70001) if quick else (5, 1000, 8192, 70001)):
            for kind in ("kl", "mse"):
                found.append((f"cohort_mutual_loss {name(dtype)} C={classes} {kind}",
                              cohort_case(dtype, classes, kind)))
    return found


def report(compiled, failures, arch):
    limit = SHARED_LIMIT.get(arch)
    lines = [f"# Triton kernels compiled for sm_{arch} (triton {triton.__version__}, no GPU)", "",
             f"{len(compiled)} compiled kernels; stack > 0 means registers spilled to local memory.", "",
             "| case | kernel | settings | autotuned | registers | stack (bytes) | shared (bytes) |",
             "|---|---|---|---|---|---|---|"]
    for c in compiled:
        over = " (over the limit)" if limit is not None and c.shared > limit else ""
        lines.append(f"| {c.case} | {c.kernel} | {c.settings} | {'yes' if c.autotuned else 'no'} | {c.registers} "
                     f"| {c.stack} | {c.shared}{over} |")
    if failures:
        lines += ["", "## Failed to compile", ""] + [f"- {case}: {error}" for case, error in failures]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="float32 and bfloat16, one shape per op")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args()

    with Recorder(args.arch) as recorder:
        for case, run in cases(args.quick):
            recorder.case = case
            print(case, file=sys.stderr)
            try:
                run()
            except Exception as error:  # noqa: BLE001  (every failure is reported, then the run fails)
                recorder.fail(error)
    failures = recorder.failures
    text = report(recorder.compiled, failures, args.arch)
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text)
    limit = SHARED_LIMIT.get(args.arch)
    over = [c for c in recorder.compiled if limit is not None and c.shared > limit]
    return 1 if failures or over else 0


if __name__ == "__main__":
    sys.exit(main())
