"""`shift_expand`: argument checks, fake (meta) kernels, autograd and backend choice."""

from typing import Optional

import torch
from torch import Tensor

import python_ref

from .._autocast import autocast_inputs, reference_context
from .._backend import check_backend_dtype, resolve_backend
from .._checks import check_tensor
from ._library import register_kernel_ops

OP = "shift_expand"
# Preferred GPU backends for `auto`, fastest first: Triton's forward was 1.4-1.8x CUDA C++'s on an H100,
# and its forward+backward faster on three of the four workloads (benchmarks/results/h100-2026-11-22.md).
GPU_ORDER = ("triton", "cuda")


def shift_expand(x, scale_local=None, shift_local=None, scale_global=None, shift_global=None, gate=None,
                 weight=None, bias=None, eps=1e-5, backend="auto"):
    """One fused step of Step fusion: shift and expand `x` under local and global guidance, then LayerNorm.

    Shapes: x, scale_local, shift_local (B, L, D); scale_global, shift_global (B, D); gate, weight, bias (D,).
    Every optional argument may be None (a missing factor is 1, a missing term 0, gate/weight default
    to ones, bias to zeros)::

        s = (1 + tanh(scale_local)) * (1 + tanh(scale_global)[:, None, :])
        t = shift_local + shift_global[:, None, :]
        h = x + gate * ((s - 1) * x + t)
        y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias      # over D, biased variance

    Gradients reach every tensor argument (global ones summed over L; gate, weight, bias over B and L).
    Arithmetic is fp32 (fp64 for fp64 inputs); y has x's dtype. The inputs share one dtype, except inside
    torch.autocast, where they are first cast to the widest of theirs (none when one is float64).
    backend: "auto", "reference", "cpu", "cuda" or "triton" (see `stepfusion_kernels.backends()`). torch.func (grad,
    vjp, jacrev, vmap) works on every backend; double backward and forward-mode AD (jvp) only on
    backend="reference": the kernel backends raise RuntimeError.
    """
    args = autocast_inputs("promote", (x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias))
    _check_arguments(*args, eps)
    x = args[0]
    backend = resolve_backend(OP, backend, x.device, x.dtype, GPU_ORDER)
    check_backend_dtype(OP, backend, x.dtype)
    if backend == "reference":
        with reference_context(x):
            return python_ref.shift_expand(*args, eps=eps)
    y, _, _ = _KERNELS(backend, *args, float(eps))
    return y


def _check_arguments(x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias, eps):
    check_tensor(OP, "x", x, shape=(None, None, None))
    batch, length, dim = x.shape
    for name, value in (("scale_local", scale_local), ("shift_local", shift_local)):
        check_tensor(OP, name, value, shape=(batch, length, dim), like=x, optional=True)
    for name, value in (("scale_global", scale_global), ("shift_global", shift_global)):
        check_tensor(OP, name, value, shape=(batch, dim), like=x, optional=True)
    for name, value in (("gate", gate), ("weight", weight), ("bias", bias)):
        check_tensor(OP, name, value, shape=(dim,), like=x, optional=True)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{OP}: eps must be a non-negative float, got {eps!r}")


# The Triton kernels as their own op, so that they run under torch.compile and opcheck like the C++ ones.
@torch.library.custom_op("stepfusion::shift_expand_triton", mutates_args=())
def _shift_expand_triton(x: Tensor, scale_local: Optional[Tensor], shift_local: Optional[Tensor],
                         scale_global: Optional[Tensor], shift_global: Optional[Tensor], gate: Optional[Tensor],
                         weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton import shift_expand as kernels

    return kernels.forward(x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias, eps)


@torch.library.custom_op("stepfusion::shift_expand_triton_backward", mutates_args=())
def _shift_expand_triton_backward(grad_y: Tensor, x: Tensor, scale_local: Optional[Tensor],
                                  shift_local: Optional[Tensor], scale_global: Optional[Tensor],
                                  shift_global: Optional[Tensor], gate: Optional[Tensor], weight: Optional[Tensor],
                                  bias: Optional[Tensor], mean: Tensor, rstd: Tensor) -> tuple[
                                      Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..triton import shift_expand as kernels

    return kernels.backward(grad_y, x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias,
                            mean, rstd)


def _fake_forward(x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias, eps):
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats_shape = x.shape[:2]
    return torch.empty_like(x), x.new_empty(stats_shape, dtype=stat_dtype), x.new_empty(stats_shape, dtype=stat_dtype)


def _fake_backward(grad_y, x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias, mean, rstd):
    inputs = (x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias)
    return tuple(x.new_empty(0) if arg is None else torch.empty_like(arg, memory_format=torch.contiguous_format)
                 for arg in inputs)


def _setup_context(ctx, inputs, output):
    *tensors, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(*tensors, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _autograd_backward(backward_op):
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        saved = ctx.saved_tensors
        grads = backward_op(grad_y, *saved)
        # An absent optional argument comes back as an empty tensor; autograd wants None there.
        return (*(None if arg is None else grad for arg, grad in zip(saved[:8], grads)), None)

    return backward


_KERNELS = register_kernel_ops(OP, _fake_forward, _fake_backward, _autograd_backward, _setup_context)
