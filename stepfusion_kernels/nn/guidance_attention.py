import torch.nn.functional as F
from torch import nn

from ..ops.guidance_attention import guidance_attention


class GuidanceAttention(nn.Module):
    """Cross-modal guidance attention: the sequence x of modality A (B, La, dim) attends to the guide
    sequence of modality B (B, Lb, dim_kv), locally within `window` of each query's time-aligned key
    (window=-1: every key) and globally to `global_tokens` summary tokens of the guide. Inputs and the
    output are (B, L, features), as nn.MultiheadAttention with batch_first=True.

    q = x W_q, k = guide W_k, v = guide W_v, split into `heads` heads of dim // heads; the G global
    tokens are the means of G consecutive segments of B's projected keys and values (adaptive average
    pooling over Lb; G = 0: none); the heads' outputs are joined and projected back to dim. See
    `stepfusion_kernels.guidance_attention` for the attention itself."""

    def __init__(self, dim, heads, window=-1, global_tokens=0, dim_kv=None, bias=True, backend="auto",
                 device=None, dtype=None):
        super().__init__()
        if heads < 1 or dim % heads != 0:
            raise ValueError(f"GuidanceAttention: dim ({dim}) must be a multiple of heads ({heads})")
        if global_tokens < 0:
            raise ValueError(f"GuidanceAttention: global_tokens must be >= 0, got {global_tokens}")
        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.dim_kv = dim if dim_kv is None else dim_kv
        self.heads = heads
        self.window = window
        self.global_tokens = global_tokens
        self.backend = backend
        self.q_proj = nn.Linear(dim, dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.dim_kv, dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.dim_kv, dim, bias=bias, **factory)
        self.out_proj = nn.Linear(dim, dim, bias=bias, **factory)

    def _split_heads(self, t):
        # (B, L, dim) -> (B, H, L, Dh), a view where the layout allows; the kernels copy it once if needed.
        batch, length, _ = t.shape
        return t.reshape(batch, length, self.heads, self.dim // self.heads).transpose(1, 2)

    def _global_tokens(self, t):
        # Segment means over the guide's length: (B, Lb, dim) -> (B, G, dim).
        return F.adaptive_avg_pool1d(t.transpose(1, 2), self.global_tokens).transpose(1, 2)

    def forward(self, x, guide):
        q = self.q_proj(x)
        k = self.k_proj(guide)
        v = self.v_proj(guide)
        k_global = v_global = None
        if self.global_tokens > 0:
            k_global = self._split_heads(self._global_tokens(k))
            v_global = self._split_heads(self._global_tokens(v))
        out = guidance_attention(self._split_heads(q), self._split_heads(k), self._split_heads(v), k_global,
                                 v_global, window=self.window, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.dim))

    def extra_repr(self):
        return (f"{self.dim}, heads={self.heads}, window={self.window}, global_tokens={self.global_tokens}, "
                f"dim_kv={self.dim_kv}, backend={self.backend!r}")
