"""Benchmark workloads of `shift_expand`: our backends against the eager reference and torch.compile of it.
The full step (every optional argument present) is timed; GB/s counts the unavoidable traffic."""

import torch

import python_ref

from .. import backends
from ..ops.shift_expand import shift_expand
from ._harness import COMPILE, EAGER, FORWARD, FORWARD_BACKWARD, BenchCase

SHAPES = {"cpu": [(8, 512, 256), (32, 96, 512)], "cuda": [(8, 4096, 1024), (32, 1024, 2048)]}
DTYPES = {"cpu": [torch.float32], "cuda": [torch.float32, torch.bfloat16]}


def _inputs(batch, length, dim, device, dtype):
    def make():
        def t(*shape):
            return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

        return {"x": t(batch, length, dim), "scale_local": t(batch, length, dim), "shift_local": t(batch, length, dim),
                "scale_global": t(batch, dim), "shift_global": t(batch, dim), "gate": t(dim), "weight": t(dim),
                "bias": t(dim)}

    return make


def cases(device, shapes=None):
    compiled_reference = torch.compile(python_ref.shift_expand)
    contenders = {EAGER: python_ref.shift_expand, COMPILE: compiled_reference}
    for backend in backends():
        if backend in (("cpu",) if device == "cpu" else ("cuda", "triton")):
            contenders[backend] = lambda backend=backend, **kw: shift_expand(**kw, backend=backend)
    result = []
    for dtype in DTYPES[device]:
        for batch, length, dim in shapes or SHAPES[device]:
            tensor_bytes = batch * length * dim * torch.tensor([], dtype=dtype).element_size()
            result.append(BenchCase(
                op="shift_expand", label=f"B{batch} L{length} D{dim}", device=device, dtype=dtype,
                make_inputs=_inputs(batch, length, dim, device, dtype), contenders=dict(contenders),
                # forward: read x, scale_local, shift_local, write y; backward: read dy, x, scale_local,
                # shift_local, write three gradients.
                bytes_moved={FORWARD: 4 * tensor_bytes, FORWARD_BACKWARD: 11 * tensor_bytes},
            ))
    return result
