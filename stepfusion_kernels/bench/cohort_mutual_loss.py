"""Benchmark workloads of `cohort_mutual_loss`: our backends against the reference's O(S^2) loop over
(student, teacher) pairs, eager and under torch.compile. GB/s counts the unavoidable traffic (reading the
(S, N, C) outputs; the backward reads them again and writes their gradient)."""

import torch

import python_ref

from .. import backends
from ..ops.cohort_mutual_loss import cohort_mutual_loss
from ._harness import COMPILE, EAGER, FORWARD, FORWARD_BACKWARD, BenchCase

# (S, N, C, kind). Compiling the reference unrolls its S^2 pairs into one graph: at S = 32 (1024 pairs)
# that took over ten minutes on a 2-core CPU machine, so the compiled reference runs only up to
# MAX_COMPILED_STUDENTS; the eager loop is the baseline at every S.
SHAPES = {
    "cpu": [(8, 256, 10, "kl"), (32, 256, 10, "kl"), (8, 256, 100, "mse")],
    "cuda": [(8, 256, 4, "kl"), (32, 256, 1000, "kl"), (64, 256, 1000, "mse")],
}
DTYPES = {"cpu": [torch.float32], "cuda": [torch.float32, torch.bfloat16]}
MAX_COMPILED_STUDENTS = 8


def _inputs(students, batch, classes, kind, device, dtype):
    def make():
        return {"outputs": torch.randn(students, batch, classes, device=device, dtype=dtype).requires_grad_(),
                "teacher_weights": torch.rand(students, device=device, dtype=dtype) + 0.1, "kind": kind}

    return make


def cases(device, shapes=None):
    compiled_reference = torch.compile(python_ref.cohort_mutual_loss)
    ours = {}
    for backend in backends():
        if backend in (("cpu",) if device == "cpu" else ("cuda", "triton")):
            ours[backend] = lambda backend=backend, **kw: cohort_mutual_loss(**kw, backend=backend)
    result = []
    for dtype in DTYPES[device]:
        for students, batch, classes, kind in shapes or SHAPES[device]:
            contenders = {EAGER: python_ref.cohort_mutual_loss}
            if students <= MAX_COMPILED_STUDENTS:
                contenders[COMPILE] = compiled_reference
            contenders.update(ours)
            tensor_bytes = students * batch * classes * torch.tensor([], dtype=dtype).element_size()
            result.append(BenchCase(
                op="cohort_mutual_loss", label=f"S{students} N{batch} C{classes} {kind}", device=device, dtype=dtype,
                make_inputs=_inputs(students, batch, classes, kind, device, dtype), contenders=contenders,
                bytes_moved={FORWARD: tensor_bytes, FORWARD_BACKWARD: 3 * tensor_bytes},
            ))
    return result
