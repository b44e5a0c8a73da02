"""Reference of `skew_pair_project` (SPEC section 3), computed in at least float32. It gathers the
layers of every pair (ha[pairs[:, 0]]), which the kernels avoid; plain indexing keeps it literal."""

import torch


def skew_pair_project(ha, hb, pairs, weight_a, bias_a=None, weight_b=None, bias_b=None):
    compute_dtype = torch.promote_types(ha.dtype, torch.float32)
    if weight_b is None:
        weight_b, bias_b = weight_a, bias_a
    num_pairs = pairs.shape[0]

    def project(stack, layers, weight, bias):
        weight = weight.to(compute_dtype)
        if weight.dim() == 2:  # one weight shared by every pair
            weight = weight.expand(num_pairs, *weight.shape)
        out = stack.to(compute_dtype)[layers] @ weight.transpose(1, 2)  # (P, N, E) @ (P, E, F)
        if bias is not None:
            bias = bias.to(compute_dtype)
            out = out + (bias[:, None, :] if bias.dim() == 2 else bias)  # (P, 1, F) or (F,)
        return out.to(ha.dtype)

    return project(ha, pairs[:, 0], weight_a, bias_a), project(hb, pairs[:, 1], weight_b, bias_b)
