"""Reference of `shift_expand` (SPEC section 1), computed in at least float32."""

import torch


def shift_expand(x, scale_local=None, shift_local=None, scale_global=None, shift_global=None,
                 gate=None, weight=None, bias=None, eps=1e-5):
    compute_dtype = torch.promote_types(x.dtype, torch.float32)

    def up(t):
        return None if t is None else t.to(compute_dtype)

    x_c = up(x)
    s = torch.ones_like(x_c)
    if scale_local is not None:
        s = s * (1 + torch.tanh(up(scale_local)))
    if scale_global is not None:
        s = s * (1 + torch.tanh(up(scale_global)))[:, None, :]
    t = torch.zeros_like(x_c)
    if shift_local is not None:
        t = t + up(shift_local)
    if shift_global is not None:
        t = t + up(shift_global)[:, None, :]
    g = x_c.new_ones(x_c.shape[-1]) if gate is None else up(gate)
    h = x_c + g * ((s - 1) * x_c + t)
    mean = h.mean(dim=-1, keepdim=True)
    var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (h - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * up(weight)
    if bias is not None:
        y = y + up(bias)
    return y.to(x.dtype)
