"""Reference of `skew_pair_project` (SPEC section 3), computed in at least float32."""

import torch


def skew_pair_project(ha, hb, pairs, weight_a, bias_a=None, weight_b=None, bias_b=None):
    compute_dtype = torch.promote_types(ha.dtype, torch.float32)

    def up(t):
        return None if t is None else t.to(compute_dtype)

    if weight_b is None:
        weight_b, bias_b = weight_a, bias_a
    per_pair = weight_a.dim() == 3
    projected_a, projected_b = [], []
    for k in range(pairs.shape[0]):
        i, j = int(pairs[k, 0]), int(pairs[k, 1])
        for stack, layer, weight, bias, out in ((ha, i, weight_a, bias_a, projected_a),
                                               (hb, j, weight_b, bias_b, projected_b)):
            w = up(weight[k] if per_pair else weight)
            y = up(stack[layer]) @ w.T
            if bias is not None:
                y = y + up(bias[k] if per_pair else bias)
            out.append(y)
    shape = (0, ha.shape[1], weight_a.shape[-2])
    pa = torch.stack(projected_a) if projected_a else ha.new_zeros(shape, dtype=compute_dtype)
    pb = torch.stack(projected_b) if projected_b else ha.new_zeros(shape, dtype=compute_dtype)
    return pa.to(ha.dtype), pb.to(ha.dtype)
