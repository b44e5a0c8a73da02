"""`guidance_attention`: argument checks, fake (meta) kernels, autograd and backend choice."""

import math
from typing import Optional

import torch
from torch import Tensor

import python_ref

from .._autocast import autocast_inputs, reference_context
from .._backend import check_backend_dtype, resolve_backend
from .._checks import check_tensor
from ._library import register_kernel_ops

OP = "guidance_attention"
# Preferred GPU backends for `auto`, fastest first: Triton was 1.5-3x faster forward+backward than CUDA
# C++ from L = 8192 on an H100, level at 4096, slower only at L = 1024
# (benchmarks/results/h100-2026-11-22.md).
GPU_ORDER = ("triton", "cuda")
# Head dims the GPU kernels are compiled for (one tile of Dh columns per program).
GPU_HEAD_DIMS = (16, 32, 64, 128)


def guidance_attention(q, k, v, k_global=None, v_global=None, window=-1, scale=None, backend="auto"):
    """Cross-modal local + global guidance attention (SPEC section 2).

    Shapes: q (B, H, Lq, Dh); k, v (B, H, Lk, Dh); k_global, v_global (B, H, G, Dh) or both None.
    Query i sees the keys j with abs(j - c_i) <= window, where c_i = ((2 i + 1) Lk) // (2 Lq) is the
    key aligned with it (c_i = i when Lq == Lk), or every key when window == -1, and all G global
    tokens::

        scores_ij = scale * <q_i, k_j>  (allowed j),   scores_ig = scale * <q_i, k_global_g>
        o_i = softmax(scores_i) @ [v_allowed ; v_global]

    scale defaults to Dh ** -0.5. Returns o of shape (B, H, Lq, Dh) and q's dtype (inside torch.autocast
    the inputs are first cast to its dtype, as for PyTorch's attention, unless one is float64). Gradients
    reach q, k, v, k_global and v_global. The kernels are flash-attention style: online softmax over the
    key blocks that intersect each query block's band (work about Lq * (2 window + 1 + G), not Lq * Lk),
    fp32 accumulation (fp64 for fp64), and a backward that recomputes the probabilities from the saved row
    logsumexp; the global-token gradients are reduced in a fixed order (bitwise reproducible). As in
    flash-attention, the backward's row term delta_i = <dO_i, o_i> uses o as returned, so the gradients of
    query row i carry o_i's rounding: an error of about scale * u |dO_i| |o_i| |k| (u = 2^-8 in bfloat16,
    2^-11 in float16, 2^-24 in float32), however small those gradients are. They are small where the softmax
    is nearly one-hot (large scores): there the error can match them, as it cannot in a product of softmax
    and scores written out (the reference), where a one-hot row's gradient comes out exactly 0.
    Lk may be 0 when global tokens are given. The cuda and triton backends take Dh in
    {16, 32, 64, 128}; the cpu backend any Dh. backend: "auto", "reference", "cpu", "cuda" or "triton"
    (see `stepfusion_kernels.backends()`); on CUDA tensors "auto" runs the reference for another Dh or for
    float64. torch.func (grad, vjp, jacrev, vmap) works on every backend; double
    backward and forward-mode AD (jvp) only on backend="reference": the kernel backends raise RuntimeError.
    """
    q, k, v, k_global, v_global = autocast_inputs("lower", (q, k, v, k_global, v_global))
    scale = _check_arguments(q, k, v, k_global, v_global, window, scale)
    # `auto` leaves a head dim that the GPU kernels lack to the reference.
    gpu_order = GPU_ORDER if q.shape[-1] in GPU_HEAD_DIMS else ()
    backend = resolve_backend(OP, backend, q.device, q.dtype, gpu_order)
    check_backend_dtype(OP, backend, q.dtype)
    if backend == "reference":
        with reference_context(q):
            return python_ref.guidance_attention(q, k, v, k_global, v_global, window=window, scale=scale)
    if backend in ("cuda", "triton") and q.shape[-1] not in GPU_HEAD_DIMS:
        raise ValueError(f"{OP}: backend {backend!r} supports head dims {GPU_HEAD_DIMS} (q.shape[-1]), "
                         f"got {q.shape[-1]}; the cpu and reference backends take any")
    out, _ = _KERNELS(backend, q, k, v, k_global, v_global, window, scale)
    return out


def _check_arguments(q, k, v, k_global, v_global, window, scale):
    """Raises on bad arguments; returns the scale as a float."""
    check_tensor(OP, "q", q, shape=(None, None, None, None))
    batch, heads, len_q, head_dim = q.shape
    check_tensor(OP, "k", k, shape=(batch, heads, None, head_dim), like=q)
    check_tensor(OP, "v", v, shape=(batch, heads, k.shape[2], head_dim), like=q)
    if (k_global is None) != (v_global is None):
        raise ValueError(f"{OP}: k_global and v_global must be given together, got "
                         f"k_global={'None' if k_global is None else 'a tensor'}, "
                         f"v_global={'None' if v_global is None else 'a tensor'}")
    check_tensor(OP, "k_global", k_global, shape=(batch, heads, None, head_dim), like=q, optional=True)
    globals_ = 0
    if k_global is not None:
        check_tensor(OP, "v_global", v_global, shape=(batch, heads, k_global.shape[2], head_dim), like=q)
        globals_ = k_global.shape[2]
    if not isinstance(window, int) or isinstance(window, bool) or window < -1:
        raise ValueError(f"{OP}: window must be an int, -1 (all keys) or >= 0, got {window!r}")
    if k.shape[2] == 0 and globals_ == 0 and batch * heads * len_q > 0:
        raise ValueError(f"{OP}: k has Lk = 0 keys and no global tokens are given: every query needs a key")
    if scale is None:
        return head_dim ** -0.5 if head_dim > 0 else 1.0
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"{OP}: scale must be a finite float or None, got {scale!r}")
    return float(scale)


# The Triton kernels as their own op, so that they run under torch.compile and opcheck like the C++ ones.
@torch.library.custom_op("stepfusion::guidance_attention_triton", mutates_args=())
def _guidance_attention_triton(q: Tensor, k: Tensor, v: Tensor, k_global: Optional[Tensor],
                               v_global: Optional[Tensor], window: int, scale: float) -> tuple[Tensor, Tensor]:
    from ..triton import guidance_attention as kernels

    return kernels.forward(q, k, v, k_global, v_global, window, scale)


@torch.library.custom_op("stepfusion::guidance_attention_triton_backward", mutates_args=())
def _guidance_attention_triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                        k_global: Optional[Tensor], v_global: Optional[Tensor], out: Tensor,
                                        lse: Tensor, window: int, scale: float) -> tuple[
                                            Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..triton import guidance_attention as kernels

    return kernels.backward(grad_out, q, k, v, k_global, v_global, out, lse, window, scale)


def _fake_forward(q, k, v, k_global, v_global, window, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype)


def _fake_backward(grad_out, q, k, v, k_global, v_global, out, lse, window, scale):
    return tuple(q.new_empty(0) if arg is None else arg.new_empty(arg.shape)
                 for arg in (q, k, v, k_global, v_global))


def _setup_context(ctx, inputs, output):
    q, k, v, k_global, v_global, window, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, k_global, v_global, out, lse)
    ctx.window, ctx.scale = window, scale
    ctx.mark_non_differentiable(lse)


def _autograd_backward(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, k_global, v_global, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v, grad_k_global, grad_v_global = backward_op(
            grad_out, q, k, v, k_global, v_global, out, lse, ctx.window, ctx.scale)
        # Absent global tokens come back as empty tensors; autograd wants None there.
        if k_global is None:
            grad_k_global = grad_v_global = None
        return grad_q, grad_k, grad_v, grad_k_global, grad_v_global, None, None

    return backward


# Every tensor of the forward and backward ops is (B, ...) with independent rows, the gradients included (no
# parameter summed over the batch): under vmap the vmapped dimension folds into B.
_KERNELS = register_kernel_ops(OP, _fake_forward, _fake_backward, _autograd_backward, _setup_context,
                               batch_folding=True)
