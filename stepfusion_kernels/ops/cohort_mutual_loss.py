"""`cohort_mutual_loss`: argument checks, fake (meta) kernels, autograd and backend choice."""

import torch
from torch import Tensor

import python_ref

from .._autocast import autocast_inputs, reference_context
from .._backend import check_backend_dtype, resolve_backend
from .._checks import check_tensor, format_shape
from ._library import register_kernel_ops

OP = "cohort_mutual_loss"
KINDS = ("kl", "mse")
# Preferred GPU backends for `auto`, fastest first: CUDA C++ was 1.3-2x faster than Triton on every
# workload on an H100 (benchmarks/results/h100-2026-11-22.md).
GPU_ORDER = ("cuda", "triton")


def cohort_mutual_loss(outputs, teacher_weights, kind="kl", backend="auto"):
    """Meta Fusion's soft information sharing: every student's penalty towards the weighted teachers.

    outputs (S, N, C): the logits (kind="kl") or predictions (kind="mse") of S students on one batch of N
    samples with C classes; teacher_weights (S,): w_j >= 0 with W = sum_j w_j > 0 (zero for a student that
    does not teach: its outputs are then left out of the other students' penalties, so a NaN or Inf in them
    stays in its own), same dtype and device as outputs. Returns penalty (S,) in outputs' dtype (inside
    torch.autocast both are first cast to float32, as for PyTorch's losses, unless one is float64)::

        kl:  penalty_i = 1/(N W) * sum_n sum_j w_j * KL(softmax(outputs[j, n]) || softmax(outputs[i, n]))
        mse: penalty_i = 1/(N C W) * sum_n sum_j w_j * ||outputs[j, n] - outputs[i, n]||^2

    Teachers are detached: the gradient reaches outputs[i] only through student i's own term
    ((softmax(outputs[i]) - q) / N per row for kl with q = sum_j w_j softmax(outputs[j]) / W, and
    2 (outputs[i] - mu) / (N C) for mse with mu = sum_j w_j outputs[j] / W); teacher_weights gets none.
    The kernels build the teacher mixture once per row, so the cost is O(S N C), and reduce over n in a
    fixed order (bitwise reproducible). Arithmetic is fp32 (fp64 for fp64 inputs). The kernels sum each KL
    from per-class differences of log-probabilities in a form that cancels the rounding of the log-sum-exps,
    so a small penalty (students that nearly agree) keeps float32 accuracy: logits 0.03 apart give relative
    errors of about 1e-6, where the definition evaluated as written in float32 (the reference backend) gives
    3e-5 to 5e-5.

    Limits: N = 0 gives zeros (an empty batch adds no penalty); S = 0 gives an empty (0,) tensor; C must be
    >= 1 when S > 0. The weights' values are checked (finite, >= 0, positive sum) on the host: one
    device-to-host copy per call for CUDA tensors. backend: "auto", "reference", "cpu", "cuda" or "triton".
    torch.func (grad, vjp, jacrev, vmap) works on every backend; double backward and forward-mode AD (jvp) only on
    backend="reference": the kernel backends raise RuntimeError.
    """
    outputs, teacher_weights = autocast_inputs("float32", (outputs, teacher_weights))
    _check_arguments(outputs, teacher_weights, kind)
    backend = resolve_backend(OP, backend, outputs.device, outputs.dtype, GPU_ORDER)
    check_backend_dtype(OP, backend, outputs.dtype)
    if backend == "reference":
        # Reading the weights' values would break a compiled graph: there an op checks them at run time, as
        # the kernel ops do. The reference detaches the weights anyway.
        if torch.compiler.is_compiling():
            teacher_weights = torch.ops.stepfusion.cohort_mutual_loss_checked_weights(teacher_weights.detach())
        else:
            checked_total_weight(teacher_weights)
        with reference_context(outputs):
            return python_ref.cohort_mutual_loss(outputs, teacher_weights, kind)
    penalty, _, _ = _KERNELS(backend, outputs, teacher_weights, kind)
    return penalty


def _check_arguments(outputs, teacher_weights, kind):
    check_tensor(OP, "outputs", outputs, shape=(None, None, None))
    students, _, classes = outputs.shape
    check_tensor(OP, "teacher_weights", teacher_weights, shape=(students,), like=outputs)
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"{OP}: kind must be one of {KINDS}, got {kind!r}")
    if students > 0 and classes == 0:
        raise ValueError(f"{OP}: outputs must have at least one class (C >= 1), "
                         f"got shape {format_shape(outputs.shape)}")


def checked_total_weight(teacher_weights):
    """W = sum(teacher_weights) as a Python float, after checking every weight finite and >= 0 and W > 0."""
    host = teacher_weights.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(host) | (host < 0)
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"{OP}: teacher_weights must be finite and >= 0, got {host[index].item()} at index {index}")
    total = host.sum().item()
    if host.numel() > 0 and not total > 0:
        raise ValueError(f"{OP}: teacher_weights must have a positive sum, got {total}")
    return total


# The reference's weight check inside a compiled graph: a copy of the weights (an op may not return its
# input), made after checking them on the host.
@torch.library.custom_op("stepfusion::cohort_mutual_loss_checked_weights", mutates_args=())
def _checked_weights(teacher_weights: Tensor) -> Tensor:
    checked_total_weight(teacher_weights)
    return teacher_weights.clone()


@_checked_weights.register_fake
def _(teacher_weights):
    return torch.empty_like(teacher_weights)


# The Triton kernels as their own op, so that they run under torch.compile and opcheck like the C++ ones.
@torch.library.custom_op("stepfusion::cohort_mutual_loss_triton", mutates_args=())
def _cohort_mutual_loss_triton(outputs: Tensor, teacher_weights: Tensor, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton import cohort_mutual_loss as kernels

    _check_arguments(outputs, teacher_weights, kind)
    return kernels.forward(outputs, teacher_weights, kind, checked_total_weight(teacher_weights))


@torch.library.custom_op("stepfusion::cohort_mutual_loss_triton_backward", mutates_args=())
def _cohort_mutual_loss_triton_backward(grad_penalty: Tensor, outputs: Tensor, mixture: Tensor, lse: Tensor,
                                        kind: str) -> Tensor:
    from ..triton import cohort_mutual_loss as kernels

    return kernels.backward(grad_penalty, outputs, mixture, lse, kind)


def _fake_forward(outputs, teacher_weights, kind):
    if kind not in KINDS:
        raise ValueError(f"{OP}: kind must be one of {KINDS}, got {kind!r}")
    students, batch, classes = outputs.shape
    acc_dtype = torch.float64 if outputs.dtype == torch.float64 else torch.float32
    lse_shape = (students, batch) if kind == "kl" else (0,)
    return (outputs.new_empty(students), outputs.new_empty((batch, classes), dtype=acc_dtype),
            outputs.new_empty(lse_shape, dtype=acc_dtype))


def _fake_backward(grad_penalty, outputs, mixture, lse, kind):
    return torch.empty_like(outputs, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    outputs, _teacher_weights, kind = inputs
    _penalty, mixture, lse = output
    ctx.save_for_backward(outputs, mixture, lse)
    ctx.kind = kind
    ctx.mark_non_differentiable(mixture, lse)


def _autograd_backward(backward_op):
    def backward(ctx, grad_penalty, _grad_mixture, _grad_lse):
        outputs, mixture, lse = ctx.saved_tensors
        # The teachers are detached, so teacher_weights gets no gradient (and kind is not a tensor).
        return backward_op(grad_penalty, outputs, mixture, lse, ctx.kind), None, None

    return backward


_KERNELS = register_kernel_ops(OP, _fake_forward, _fake_backward, _autograd_backward, _setup_context)
