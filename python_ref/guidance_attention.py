"""Reference of `guidance_attention` (SPEC section 2): dense scores, a boolean band mask, one softmax over
the allowed keys and the global tokens. Computed in at least float32; O(Lq * Lk) on purpose."""

import torch


def band_mask(len_q, len_k, window, device=None):
    """(Lq, Lk) bool: query i sees key j iff window == -1 or abs(j - c_i) <= window, with the aligned
    centre c_i = ((2 i + 1) Lk) // (2 Lq)."""
    if window < 0:
        return torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    i = torch.arange(len_q, device=device)
    centre = ((2 * i + 1) * len_k) // (2 * len_q)
    j = torch.arange(len_k, device=device)
    return (j[None, :] - centre[:, None]).abs() <= window


def guidance_attention(q, k, v, k_global=None, v_global=None, window=-1, scale=None):
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    head_dim = q.shape[-1]
    if scale is None:
        scale = head_dim ** -0.5 if head_dim > 0 else 1.0
    q_c, k_c, v_c = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    scores = scale * (q_c @ k_c.transpose(-1, -2))
    allowed = band_mask(q.shape[2], k.shape[2], window, device=q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    values = v_c
    if k_global is not None:
        global_scores = scale * (q_c @ k_global.to(compute_dtype).transpose(-1, -2))
        scores = torch.cat([scores, global_scores], dim=-1)
        values = torch.cat([v_c, v_global.to(compute_dtype)], dim=2)
    return (torch.softmax(scores, dim=-1) @ values).to(q.dtype)
