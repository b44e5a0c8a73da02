"""`skew_pair_project` and `skew_pairs`: argument checks, fake (meta) kernels, autograd and backend choice."""

from typing import Optional

import torch
from torch import Tensor

import python_ref

from .._autocast import autocast_inputs, reference_context
from .._backend import check_backend_dtype, resolve_backend
from .._checks import check_tensor, format_shape
from ._library import register_kernel_ops

OP = "skew_pair_project"
# Preferred GPU backends for `auto`, fastest first: on an H100 the CUDA backend's cuBLASLt GEMMs beat the
# Triton kernels at every benchmarked shape but one, by 1.4x-3.7x at N = 4096; at N16 P1 bf16 forward the
# two are level, launch and host costs dominating both (benchmarks/results/h100-2026-11-23.md).
GPU_ORDER = ("cuda", "triton")
ANCHORS = ("top", "bottom")


def skew_pair_project(ha, hb, pairs, weight_a, bias_a=None, weight_b=None, bias_b=None, backend="auto"):
    """Sparse skew-pair projection of SSFN: project layer i_k of modality A and layer j_k of modality B
    for every pair k, in one grouped GEMM that reads the layer rows in place (no gathered copy)::

        pa[k] = ha[i_k] @ weight_a(k).T + bias_a(k)          # (P, N, F)
        pb[k] = hb[j_k] @ weight_b(k).T + bias_b(k)          # (P, N, F)

    Shapes: ha (LA, N, E), hb (LB, N, E); pairs (P, 2) int64 with 0 <= i_k < LA, 0 <= j_k < LB (repeats
    allowed; see `skew_pairs`), on ha's device or on the CPU (with GPU inputs, CPU pairs spare every call
    the device-to-host copy, and wait for the GPU, that checking them and planning the GEMMs need; GPU
    pairs cost the CUDA backend one such copy per call);
    weight_a (F, E) shared by every pair, or (P, F, E) one per pair (nn.Linear layout); bias_a (F,) or
    (P, F) to match, or None. weight_b / bias_b as for A; weight_b=None means B uses weight_a and bias_a
    (SSFN's one fusion block serves both modalities), and bias_b must then be None.

    Gradients reach ha, hb and the weights and biases; a layer used by several pairs (or a weight
    shared by the pairs / the two modalities) gets the sum of their contributions, added in a fixed
    order, so the backward is bitwise reproducible. Arithmetic is fp32 (fp64 for fp64 inputs); pa
    and pb have ha's dtype (inside torch.autocast the inputs are first cast to its dtype, as for a linear
    layer, unless one is float64). backend: "auto", "reference", "cpu", "cuda" (cuBLASLt pointer-array GEMMs,
    the operands read in place; STEPFUSION_SKEW_FORWARD and STEPFUSION_SKEW_WEIGHT_GROUPS select its
    opt-in variants, see the README) or "triton" (with STEPFUSION_SKEW_TRITON_TMA=1, its tiles move by
    TMA descriptors where the GPU and shapes allow). torch.func (grad, vjp, jacrev, vmap) works on every backend;
    double backward and forward-mode AD (jvp) only on backend="reference": the kernel backends raise RuntimeError.
    """
    ha, hb, pairs, weight_a, bias_a, weight_b, bias_b = autocast_inputs(
        "lower", (ha, hb, pairs, weight_a, bias_a, weight_b, bias_b))
    _check_arguments(ha, hb, pairs, weight_a, bias_a, weight_b, bias_b)
    backend = resolve_backend(OP, backend, ha.device, ha.dtype, GPU_ORDER)
    check_backend_dtype(OP, backend, ha.dtype)
    # A data-dependent check, which torch.compile cannot trace: the kernel ops check the range themselves at
    # run time (RuntimeError), and the reference, which would wrap a negative index around, gets an op
    # that checks it at run time.
    if not torch.compiler.is_compiling():
        if backend == "cuda" and pairs.device.type != "cpu":
            # The C++ op plans its GEMMs from pairs on the host: one copy here serves the check, the
            # forward and the backward, instead of a copy and a wait in each.
            pairs = pairs.cpu()
        _check_pair_range(pairs, ha.shape[0], hb.shape[0], ValueError)
    elif backend == "reference":
        pairs = torch.ops.stepfusion.skew_pair_project_checked_pairs(pairs, ha.shape[0], hb.shape[0])
    args = (ha, hb, pairs, weight_a, bias_a, weight_b, bias_b)
    if backend == "reference":
        with reference_context(ha):
            return python_ref.skew_pair_project(*args)
    return _KERNELS(backend, *args)


def skew_pairs(skew, num_pairs, layers_a, layers_b, anchor="top"):
    """The pair set of SSFN as a (P, 2) int64 tensor of 0-based layers (layer L-1 the deepest).

    anchor="top":    pair k = (layers_a-1 - max(0, -skew) - k, layers_b-1 - max(0, skew) - k)
    anchor="bottom": pair k = (max(0, skew) + k, max(0, -skew) + k)
    for k = 0..num_pairs-1, so i - j = skew when layers_a == layers_b. A pair set that leaves either
    stack is a ValueError. Late fusion is skew_pairs(0, 1, L, L); SSFN is one pair with skew != 0.
    """
    for name, value, least in (("skew", skew, None), ("num_pairs", num_pairs, 0), ("layers_a", layers_a, 1),
                               ("layers_b", layers_b, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or (least is not None and value < least):
            expected = "an int" if least is None else f"an int >= {least}"
            raise ValueError(f"skew_pairs: {name} must be {expected}, got {value!r}")
    if anchor not in ANCHORS:
        raise ValueError(f"skew_pairs: anchor must be one of {ANCHORS}, got {anchor!r}")
    k = torch.arange(num_pairs, dtype=torch.int64)
    if anchor == "top":
        pairs = torch.stack([layers_a - 1 - max(0, -skew) - k, layers_b - 1 - max(0, skew) - k], dim=1)
    else:
        pairs = torch.stack([max(0, skew) + k, max(0, -skew) + k], dim=1)
    if num_pairs > 0 and (pairs.min() < 0 or (pairs[:, 0] >= layers_a).any() or (pairs[:, 1] >= layers_b).any()):
        raise ValueError(
            f"skew_pairs: {num_pairs} pairs of skew {skew} anchored at the {anchor} leave the stacks of "
            f"{layers_a} and {layers_b} layers (first pair {tuple(pairs[0].tolist())}, last "
            f"{tuple(pairs[-1].tolist())})"
        )
    return pairs


def _check_arguments(ha, hb, pairs, weight_a, bias_a, weight_b, bias_b):
    check_tensor(OP, "ha", ha, shape=(None, None, None))
    _, samples, in_features = ha.shape
    check_tensor(OP, "hb", hb, shape=(None, samples, in_features), like=ha)
    check_tensor(OP, "pairs", pairs, shape=(None, 2), floating=False)
    if pairs.dtype != torch.int64:
        raise ValueError(f"{OP}: pairs must be int64, got {str(pairs.dtype).replace('torch.', '')}")
    if pairs.device != ha.device and pairs.device.type != "cpu":
        raise RuntimeError(f"{OP}: pairs must be on {ha.device} like ha, or on the CPU, got {pairs.device}")
    num_pairs = pairs.shape[0]
    check_tensor(OP, "weight_a", weight_a, like=ha)
    if weight_a.dim() == 2:
        weight_shape = (None, in_features)
    elif weight_a.dim() == 3:
        weight_shape = (num_pairs, None, in_features)
    else:
        raise ValueError(f"{OP}: weight_a must have shape (F, E) or (P, F, E), got {format_shape(weight_a.shape)}")
    check_tensor(OP, "weight_a", weight_a, shape=weight_shape, like=ha)
    out_features = weight_a.shape[-2]
    bias_shape = (out_features,) if weight_a.dim() == 2 else (num_pairs, out_features)
    check_tensor(OP, "bias_a", bias_a, shape=bias_shape, like=ha, optional=True)
    check_tensor(OP, "weight_b", weight_b, shape=tuple(weight_a.shape), like=ha, optional=True)
    check_tensor(OP, "bias_b", bias_b, shape=bias_shape, like=ha, optional=True)
    if weight_b is None and bias_b is not None:
        raise ValueError(f"{OP}: bias_b must be None when weight_b is None (B then uses weight_a and bias_a)")


# Up to this many pairs the range check reads them as Python ints (a few microseconds) rather than running
# two tensor reductions (tens of microseconds of host time per call, the op's typical P being 1 to 12).
_PAIRS_CHECKED_IN_PYTHON = 256


def _check_pair_range(pairs, layers_a, layers_b, error):
    if pairs.shape[0] == 0:
        return
    if pairs.shape[0] <= _PAIRS_CHECKED_IN_PYTHON:
        columns = list(zip(*pairs.tolist()))
        low, high = [min(column) for column in columns], [max(column) for column in columns]
    else:
        low, high = (values.tolist() for values in torch.aminmax(pairs, dim=0))
    for column, layers, name in ((0, layers_a, "LA"), (1, layers_b, "LB")):
        if low[column] < 0 or high[column] >= layers:
            raise error(f"{OP}: pairs[:, {column}] must lie in [0, {name} = {layers}), got values in "
                        f"[{low[column]}, {high[column]}]")


# The reference's pair range check inside a compiled graph: a copy of pairs (an op may not return its input),
# made after checking them on the host.
@torch.library.custom_op("stepfusion::skew_pair_project_checked_pairs", mutates_args=())
def _checked_pairs(pairs: Tensor, layers_a: int, layers_b: int) -> Tensor:
    _check_pair_range(pairs, layers_a, layers_b, ValueError)
    return pairs.clone()


@_checked_pairs.register_fake
def _(pairs, layers_a, layers_b):
    return torch.empty_like(pairs)


# The Triton kernels as their own op, so that they run under torch.compile and opcheck like the C++ ones.
@torch.library.custom_op("stepfusion::skew_pair_project_triton", mutates_args=())
def _skew_pair_project_triton(ha: Tensor, hb: Tensor, pairs: Tensor, weight_a: Tensor, bias_a: Optional[Tensor],
                              weight_b: Optional[Tensor], bias_b: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    from ..triton import skew_pair_project as kernels

    _check_pair_range(pairs, ha.shape[0], hb.shape[0], RuntimeError)
    return kernels.forward(ha, hb, pairs, weight_a, bias_a, weight_b, bias_b)


@torch.library.custom_op("stepfusion::skew_pair_project_triton_backward", mutates_args=())
def _skew_pair_project_triton_backward(grad_pa: Tensor, grad_pb: Tensor, ha: Tensor, hb: Tensor, pairs: Tensor,
                                       weight_a: Tensor, bias_a: Optional[Tensor], weight_b: Optional[Tensor],
                                       bias_b: Optional[Tensor]) -> tuple[
                                           Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..triton import skew_pair_project as kernels

    _check_pair_range(pairs, ha.shape[0], hb.shape[0], RuntimeError)
    return kernels.backward(grad_pa, grad_pb, ha, hb, pairs, weight_a, bias_a, weight_b, bias_b)


def _fake_forward(ha, hb, pairs, weight_a, bias_a, weight_b, bias_b):
    shape = (pairs.shape[0], ha.shape[1], weight_a.shape[-2])
    return ha.new_empty(shape), ha.new_empty(shape)


def _fake_backward(grad_pa, grad_pb, ha, hb, pairs, weight_a, bias_a, weight_b, bias_b):
    def like(arg):
        return ha.new_empty(0) if arg is None else torch.empty_like(arg, memory_format=torch.contiguous_format)

    return like(ha), like(hb), like(weight_a), like(bias_a), like(weight_b), like(bias_b)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _autograd_backward(backward_op):
    def backward(ctx, grad_pa, grad_pb):
        ha, hb, pairs, weight_a, bias_a, weight_b, bias_b = ctx.saved_tensors
        grads = backward_op(grad_pa, grad_pb, ha, hb, pairs, weight_a, bias_a, weight_b, bias_b)
        grad_ha, grad_hb, grad_weight_a, grad_bias_a, grad_weight_b, grad_bias_b = grads
        # An absent optional argument comes back as an empty tensor; autograd wants None there.
        return (grad_ha, grad_hb, None, grad_weight_a, None if bias_a is None else grad_bias_a,
                None if weight_b is None else grad_weight_b, None if bias_b is None else grad_bias_b)

    return backward


_KERNELS = register_kernel_ops(OP, _fake_forward, _fake_backward, _autograd_backward, _setup_context)
