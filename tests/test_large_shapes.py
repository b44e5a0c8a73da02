"""64-bit indexing: shift_expand on a GPU with more than 2^31 elements in x.

Every output element is checked written (the memory it lands in is NaN-poisoned first), and the rows that
lie past element 2^31 are compared with the float64 reference computed on those rows alone (the op is
row-wise apart from the per-sample globals, which the slice keeps)."""

import pytest
import torch

import python_ref
import stepfusion_kernels as sk
from harness import HAS_CUDA, NEEDS_GPU, TOLERANCE, relative_error

# x is (1, L, D) with L * D just over 2^31; bf16 keeps each of the ~8 full-size tensors at 4 GiB.
DIM = 1024
LENGTH = (1 << 31) // DIM + 3
NEEDED_GIB = 48


def _enough_memory():
    return HAS_CUDA and torch.cuda.get_device_properties(0).total_memory >= NEEDED_GIB << 30


def _poison_free_memory(gib):
    """Leaves `gib` GiB of NaN-filled blocks in the caching allocator, which the op's outputs then reuse."""
    block = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    block.view(torch.bfloat16).fill_(float("nan"))
    del block
    torch.cuda.synchronize()


@NEEDS_GPU
@pytest.mark.large_memory
@pytest.mark.skipif(HAS_CUDA and not _enough_memory(), reason=f"needs a GPU with {NEEDED_GIB} GiB of memory")
@pytest.mark.parametrize("backend", ["cuda", "triton"], ids=["cuda-cuda", "triton-cuda"])
def test_shift_expand_past_two_to_the_31_elements(backend):
    if backend not in sk.backends():
        pytest.fail(f"backend {backend!r} is not usable on this GPU machine: {sk.backends()}")
    generator = torch.Generator(device="cuda").manual_seed(31)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=generator)

    x, scale_local, shift_local = randn(1, LENGTH, DIM), randn(1, LENGTH, DIM), randn(1, LENGTH, DIM)
    small = {"scale_global": randn(1, DIM), "shift_global": randn(1, DIM), "gate": randn(DIM),
             "weight": randn(DIM), "bias": randn(DIM)}
    assert x.numel() > 2**31
    for t in (x, scale_local, shift_local):
        t.requires_grad_()
    _poison_free_memory(24)
    y = sk.shift_expand(x, scale_local, shift_local, **small, backend=backend)
    grad_y = randn(1, LENGTH, DIM)
    _poison_free_memory(16)
    grad_x, grad_scale_local, grad_shift_local = torch.autograd.grad(y, (x, scale_local, shift_local), grad_y)

    for name, out in [("y", y), ("grad_x", grad_x), ("grad_scale_local", grad_scale_local),
                      ("grad_shift_local", grad_shift_local)]:
        assert torch.isfinite(out).all(), f"{name}: elements not written (NaN poison left) or non-finite"

    # The first row, and the rows past element 2^31.
    for rows in (slice(0, 1), slice(LENGTH - 4, LENGTH)):
        ref_inputs = [t[:, rows].detach().double().cpu().requires_grad_() for t in (x, scale_local, shift_local)]
        ref_small = {k: v.double().cpu() for k, v in small.items()}
        ref_y = python_ref.shift_expand(*ref_inputs, **ref_small)
        ref_grads = torch.autograd.grad(ref_y, ref_inputs, grad_y[:, rows].double().cpu())
        tolerance = TOLERANCE[torch.bfloat16]
        assert relative_error(y[:, rows], ref_y) <= tolerance
        for name, out, ref in zip(("grad_x", "grad_scale_local", "grad_shift_local"),
                                  (grad_x, grad_scale_local, grad_shift_local), ref_grads):
            assert relative_error(out[:, rows], ref) <= tolerance, f"{name} at rows {rows}"
