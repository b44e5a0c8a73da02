"""Triton kernels of `cohort_mutual_loss`: a forward with one program per batch row n, which builds the
teacher mixture once and then one divergence per student (O(S N C)); per-row results are reduced over n
by torch.sum on fixed shapes (deterministic, no atomics). The backward is elementwise: one program per
(student, row) pair and chunk of classes.

A row of up to FUSED_MAX classes stays in registers whole. Wider rows go to the `_wide` forward kernels,
which loop over the classes in chunks: the KL one reads every student's row three times (its log-sum-exp,
the mixture, its divergence), the MSE one twice.

Every KL is summed from the per-class differences d = log q - log p_i, as the KL of unnormalised measures
(sum_c q d + (p_i - q)), not as an entropy minus a cross-entropy: a small divergence (students that nearly
agree) keeps its accuracy; see csrc/cpu/cohort_mutual_loss.cpp."""

import torch
import triton
import triton.language as tl

from ._common import accurate_exp, row_block

# The smallest normal float32: q is clamped to it inside log(q) so that q = 0 gives q d = 0, not NaN.
TINY: tl.constexpr = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _kl_forward_kernel(outputs_ptr, weights_ptr, mixture_ptr, lse_ptr, divergence_ptr, spread_ptr,
                       students, batch, classes, total_weight, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < classes
    mixture = tl.zeros([BLOCK_C], dtype=tl.float32)  # sum_j w_j p_j, lane-wise
    for j in range(students):
        weight = tl.load(weights_ptr + j)
        if weight > 0:  # a student of weight 0 does not teach: not read (a NaN there stays out of q)
            # Masked lanes load 0 (finite, so that no 0 * inf appears) and are left out of the max.
            z = tl.load(outputs_ptr + (j * batch + n) * classes + cols, mask=mask, other=0.0).to(tl.float32)
            exps = tl.where(mask, tl.exp(z - tl.max(tl.where(mask, z, float("-inf")), axis=0)), 0.0)
            mixture += (weight / tl.sum(exps, axis=0)) * exps
    q = mixture / total_weight
    tl.store(mixture_ptr + n * classes + cols, q, mask=mask)
    log_q = tl.log(tl.maximum(q, TINY))
    spread = 0.0
    for i in range(students):
        z = tl.load(outputs_ptr + (i * batch + n) * classes + cols, mask=mask, other=0.0).to(tl.float32)
        max_z = tl.max(tl.where(mask, z, float("-inf")), axis=0)
        lse = max_z + tl.log(tl.sum(tl.where(mask, tl.exp(z - max_z), 0.0), axis=0))
        tl.store(lse_ptr + i * batch + n, lse)
        # d = log q - log p_i: KL(q || p_i) = sum_c q d + (p_i - q); a teacher adds
        # w_i KL(p_i || q) = w_i sum_c (q - p_i) - p_i d to J. p_i is exp(log p_i), to within 2 ulp, not
        # exps / sum_exp, so that the added terms cancel the rounding of lse in log p_i. p_i and q are 0 on
        # masked lanes.
        log_p = z - lse
        p = tl.where(mask, accurate_exp(log_p), 0.0)
        d = tl.where(mask, log_q - log_p, 0.0)
        tl.store(divergence_ptr + n * students + i, tl.sum(q * d + (p - q), axis=0))
        weight = tl.load(weights_ptr + i)
        if weight > 0:
            spread += weight * tl.sum((q - p) - p * d, axis=0)
    tl.store(spread_ptr + n, spread)


@triton.jit
def _mse_forward_kernel(outputs_ptr, weights_ptr, mixture_ptr, divergence_ptr, spread_ptr,
                        students, batch, classes, total_weight, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < classes
    weighted_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in range(students):
        weight = tl.load(weights_ptr + j)
        if weight > 0:  # a student of weight 0 does not teach
            f = tl.load(outputs_ptr + (j * batch + n) * classes + cols, mask=mask, other=0.0).to(tl.float32)
            weighted_sum += weight * f
    mu = weighted_sum / total_weight
    tl.store(mixture_ptr + n * classes + cols, mu, mask=mask)
    # J = sum_j w_j ||f_j - mu||^2, accumulated lane-wise.
    weighted_distance = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(students):
        weight = tl.load(weights_ptr + i)
        f = tl.load(outputs_ptr + (i * batch + n) * classes + cols, mask=mask, other=0.0).to(tl.float32)
        difference = tl.where(mask, f - mu, 0.0)
        squared = difference * difference
        weighted_distance += tl.where(weight > 0, weight * squared, 0.0)
        tl.store(divergence_ptr + n * students + i, tl.sum(squared, axis=0))
    tl.store(spread_ptr + n, tl.sum(weighted_distance, axis=0))


@triton.jit
def _kl_wide_forward_kernel(outputs_ptr, weights_ptr, mixture_ptr, lse_ptr, divergence_ptr, spread_ptr,
                            students, batch, classes, total_weight, BLOCK_C: tl.constexpr):
    """_kl_forward_kernel for rows wider than one block, chunk by chunk."""
    n = tl.program_id(0).to(tl.int64)
    # Pass 1: every student's log-sum-exp, online: the running sum is rescaled whenever the maximum grows.
    for j in range(students):
        row = outputs_ptr + (j * batch + n) * classes
        max_z = float("-inf")
        sum_exp = 0.0
        for start in range(0, classes, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = cols < classes
            z = tl.load(row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(max_z, tl.max(z, axis=0))  # finite: a chunk holds at least one class
            sum_exp = sum_exp * tl.exp(max_z - new_max) + tl.sum(tl.where(mask, tl.exp(z - new_max), 0.0), axis=0)
            max_z = new_max
        tl.store(lse_ptr + j * batch + n, max_z + tl.log(sum_exp))
    tl.debug_barrier()  # the log-sum-exps (stored by one thread) are read by every thread below
    # Pass 2: q = sum_j w_j p_j / W, chunk by chunk.
    for start in range(0, classes, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < classes
        mixture = tl.zeros([BLOCK_C], dtype=tl.float32)
        for j in range(students):
            weight = tl.load(weights_ptr + j)
            if weight > 0:  # a student of weight 0 does not teach
                z = tl.load(outputs_ptr + (j * batch + n) * classes + cols, mask=mask, other=0.0).to(tl.float32)
                mixture += weight * tl.where(mask, tl.exp(z - tl.load(lse_ptr + j * batch + n)), 0.0)
        tl.store(mixture_ptr + n * classes + cols, mixture / total_weight, mask=mask)
    tl.debug_barrier()  # q, stored chunk by chunk above, is read back below
    # Pass 3, from d = log q - log p_i: KL(q || p_i) = sum_c q d + (p_i - q) for every student i, and J = sum
    # over the teachers of w_i KL(p_i || q) = w_i sum_c (q - p_i) - p_i d.
    spread = 0.0
    for i in range(students):
        lse = tl.load(lse_ptr + i * batch + n)
        weight = tl.load(weights_ptr + i)
        to_q = tl.zeros([BLOCK_C], dtype=tl.float32)
        from_q = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, classes, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = cols < classes
            log_p = tl.load(outputs_ptr + (i * batch + n) * classes + cols, mask=mask, other=0.0).to(tl.float32) - lse
            p = tl.where(mask, accurate_exp(log_p), 0.0)
            q = tl.load(mixture_ptr + n * classes + cols, mask=mask, other=0.0)
            d = tl.where(mask, tl.log(tl.maximum(q, TINY)) - log_p, 0.0)
            to_q += q * d + (p - q)
            if weight > 0:
                from_q += (q - p) - p * d
        tl.store(divergence_ptr + n * students + i, tl.sum(to_q, axis=0))
        if weight > 0:
            spread += weight * tl.sum(from_q, axis=0)
    tl.store(spread_ptr + n, spread)


@triton.jit
def _mse_wide_forward_kernel(outputs_ptr, weights_ptr, mixture_ptr, divergence_ptr, spread_ptr,
                             students, batch, classes, total_weight, BLOCK_C: tl.constexpr):
    """_mse_forward_kernel for rows wider than one block, chunk by chunk."""
    n = tl.program_id(0).to(tl.int64)
    for start in range(0, classes, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < classes
        weighted_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
        for j in range(students):
            weight = tl.load(weights_ptr + j)
            if weight > 0:  # a student of weight 0 does not teach
                f = tl.load(outputs_ptr + (j * batch + n) * classes + cols, mask=mask, other=0.0).to(tl.float32)
                weighted_sum += weight * f
        tl.store(mixture_ptr + n * classes + cols, weighted_sum / total_weight, mask=mask)
    tl.debug_barrier()  # mu, stored chunk by chunk above, is read back below
    weighted_distance = 0.0
    for i in range(students):
        squared = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, classes, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = cols < classes
            f = tl.load(outputs_ptr + (i * batch + n) * classes + cols, mask=mask, other=0.0).to(tl.float32)
            difference = tl.where(mask, f - tl.load(mixture_ptr + n * classes + cols, mask=mask, other=0.0), 0.0)
            squared += difference * difference
        distance = tl.sum(squared, axis=0)
        tl.store(divergence_ptr + n * students + i, distance)
        weight = tl.load(weights_ptr + i)
        weighted_distance += tl.where(weight > 0, weight * distance, 0.0)
    tl.store(spread_ptr + n, weighted_distance)


@triton.jit
def _backward_kernel(outputs_ptr, mixture_ptr, lse_ptr, coefficient_ptr, grad_ptr, batch, classes,
                     IS_KL: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row = i * N + n
    student = row // batch
    n = row % batch
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < classes
    z = tl.load(outputs_ptr + row * classes + cols, mask=mask, other=0.0).to(tl.float32)
    target = tl.load(mixture_ptr + n * classes + cols, mask=mask, other=0.0)
    coefficient = tl.load(coefficient_ptr + student)
    if IS_KL:
        grad = coefficient * (tl.exp(z - tl.load(lse_ptr + row)) - target)
    else:
        grad = coefficient * (z - target)
    tl.store(grad_ptr + row * classes + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _scale(batch, classes, kind):
    if batch == 0 or classes == 0:  # no rows (or, with S = 0, no classes): nothing to average
        return 0.0
    return 1.0 / batch if kind == "kl" else 1.0 / (batch * classes)


def forward(outputs, teacher_weights, kind, total_weight):
    """Returns (penalty (S,), mixture (N, C) float32, lse (S, N) float32 for "kl" or (0,) for "mse").
    total_weight is sum(teacher_weights), already checked positive."""
    students, batch, classes = outputs.shape
    outputs = outputs.contiguous()
    float_options = dict(device=outputs.device, dtype=torch.float32)
    weights = teacher_weights.detach().to(torch.float32).contiguous()
    mixture = torch.zeros((batch, classes), **float_options)
    lse = torch.empty((students, batch) if kind == "kl" else (0,), **float_options)
    divergence = torch.empty((batch, students), **float_options)
    spread = torch.empty((batch,), **float_options)
    if students > 0 and batch > 0:
        block, num_warps, whole_row = row_block(classes)
        if kind == "kl":
            kernel = _kl_forward_kernel if whole_row else _kl_wide_forward_kernel
            kernel[(batch,)](outputs, weights, mixture, lse, divergence, spread, students, batch, classes,
                             total_weight, BLOCK_C=block, num_warps=num_warps)
        else:
            kernel = _mse_forward_kernel if whole_row else _mse_wide_forward_kernel
            kernel[(batch,)](outputs, weights, mixture, divergence, spread, students, batch, classes,
                             total_weight, BLOCK_C=block, num_warps=num_warps)
    # penalty_i = scale * sum_n (divergence[n, i] + J_n / W): fixed-shape sums over n (deterministic).
    penalty = (divergence.sum(dim=0) + spread.sum() / total_weight) * _scale(batch, classes, kind)
    return penalty.to(outputs.dtype), mixture, lse


def backward(grad_penalty, outputs, mixture, lse, kind):
    """The gradient of outputs: scale * (softmax(outputs[i]) - q) for "kl", scale * 2 (outputs[i] - mu) for "mse"."""
    students, batch, classes = outputs.shape
    outputs = outputs.contiguous()
    grad = torch.empty_like(outputs)
    if grad.numel() == 0:
        return grad
    factor = _scale(batch, classes, kind) * (2.0 if kind == "mse" else 1.0)
    coefficient = (grad_penalty.to(torch.float32) * factor).contiguous()
    block, num_warps, _ = row_block(classes)
    _backward_kernel[(students * batch, triton.cdiv(classes, block))](
        outputs, mixture.contiguous(), lse.contiguous() if kind == "kl" else mixture, coefficient, grad, batch,
        classes, IS_KL=kind == "kl", BLOCK_C=block, num_warps=num_warps)
    return grad
