"""Skew-pair fusion / SSFN (Hu et al., github Computational-social-science/Skew-pair_Fusion) as a thin,
complete model, built on `skew_pair_project` and `guidance_attention`.

Read top to bottom as the method runs:
1. encoders: two frozen L-layer encoders give, for every layer, the hidden states of their tokens; SSFN
   uses token 0 of every layer, the stacks ha (LA, N, E) and hb (LB, N, E). `LayerStackEncoder` is the
   package's own small Transformer encoder; `HuggingFaceLayerStack` adapts any Hugging Face model that
   returns `hidden_states` (`output_hidden_states=True`).
2. pairs: P layer pairs (i, j), usually `skew_pairs(d, D, LA, LB)`: i - j = d (the skew), D pairs (the
   sparsity). One pair (LA-1, LB-1) is late fusion; all same-depth pairs is pairwise fusion.
3. `SkewPairFusionBlock`, one block shared by every pair and both directions: the packed Q/K/V
   projections of every pair's two layers in one `skew_pair_project` call, then
       x = LN1(a + MHA(a, b));  x = LN2(x + FFN(x))      (A attends to B)
       y = LN1(b + MHA(b, a));  y = LN2(y + FFN(y))      (B attends to A)
       fused = (x + y) / 2                              per pair
4. `SSFN`: the mean of `fused` over the pairs, a linear head, cross-entropy.

Attention modes (both through `guidance_attention(window=-1)`):
    "batch"   the authors' form: the inputs are one vector per sample, and each sample attends to the
              other modality's vectors of every sample in the batch (the batch is the sequence, one
              attention batch entry per pair). A prediction depends on the rest of its batch.
    "sample"  each sample attends only to its own tokens of the other modality: stacks (L, N, T, E) of
              token sequences (a stack (L, N, E) counts as T = 1); each fused sequence is pooled by its
              mean over tokens. A prediction depends on its own sample only.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import format_shape
from ..nn import SkewPairProjection
from ..ops import guidance_attention, skew_pairs

ATTENTION_MODES = ("batch", "sample")


# 1. Encoders that yield per-layer hidden states ----------------------------------------------------------------

class LayerStackEncoder(nn.Module):
    """A small Transformer encoder of `layers` pre-norm layers over token sequences (N, T, in_features):
    a linear token embedding, a learned [CLS] token prepended as token 0, learned positions.

    hidden_states(x) -> (layers, N, T + 1, dim): every layer's output through one shared final LayerNorm,
    so that the layers of the stack are on one scale (pre-norm layers leave the residual stream
    unnormalised). forward(x) -> (N, classes) logits of a linear head on the last layer's token 0, for
    training the encoder on its own modality before it is frozen."""

    def __init__(self, in_features, max_tokens, classes, dim=64, heads=4, layers=12, ffn_dim=128, dropout=0.1):
        super().__init__()
        self.layers_count = layers
        self.embed = nn.Linear(in_features, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(max_tokens + 1, dim) * dim ** -0.5)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, heads, ffn_dim, dropout, batch_first=True, norm_first=True)
            for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def hidden_states(self, x):
        if x.dim() != 3 or x.shape[1] + 1 > self.position.shape[0]:
            raise ValueError(f"LayerStackEncoder: x must be (N, T <= {self.position.shape[0] - 1}, features), "
                             f"got {format_shape(x.shape)}")
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        hidden = self.dropout(tokens + self.position[: tokens.shape[1]])
        states = []
        for layer in self.layers:
            hidden = layer(hidden)
            states.append(self.norm(hidden))
        return torch.stack(states)

    def forward(self, x):
        return self.head(self.hidden_states(x)[-1, :, 0])


class HuggingFaceLayerStack(nn.Module):
    """Adapter for a Hugging Face encoder (BERT, ViT, wav2vec2, ...): hidden_states(**inputs) ->
    (layers, N, T, E), the outputs of its `layers` Transformer layers from `output_hidden_states=True`
    (the embedding output, hidden_states[0], is left out). `transformers` is an optional dependency
    (`pip install stepfusion-kernels[hf]`); this class only calls the model it is given."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def hidden_states(self, **inputs):
        outputs = self.model(**inputs, output_hidden_states=True)
        if getattr(outputs, "hidden_states", None) is None:
            raise ValueError(f"HuggingFaceLayerStack: {type(self.model).__name__} returned no hidden_states")
        return torch.stack(outputs.hidden_states[1:])


def first_token(stack):
    """Token 0 of every layer: (L, N, T, E) -> (L, N, E), the inputs of SSFN's batch mode."""
    return stack[:, :, 0]


# 3. The fusion block shared by every pair and both directions ------------------------------------------------

class SkewPairFusionBlock(nn.Module):
    """forward(ha, hb, pairs) -> (P, N, dim): `fused` of the module docstring for every pair. ha, hb are
    stacks (L, N, dim) in "batch" mode, (L, N, dim) or (L, N, T, dim) in "sample" mode (A's and B's token
    counts may differ)."""

    def __init__(self, dim, heads, ffn_dim, attention="batch", dropout=0.0, backend="auto"):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"SkewPairFusionBlock: attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if heads < 1 or dim % heads:
            raise ValueError(f"SkewPairFusionBlock: dim ({dim}) must be a multiple of heads ({heads})")
        self.dim, self.heads, self.attention, self.backend = dim, heads, attention, backend
        # Q, K and V packed as nn.MultiheadAttention's in_proj: one (3 dim, dim) weight serves both modalities.
        self.qkv = SkewPairProjection(dim, 3 * dim, shared=True, backend=backend)
        self.out_proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def _heads(self, t):
        # (B, L, dim) -> (B, H, L, Dh)
        return t.unflatten(-1, (self.heads, self.dim // self.heads)).transpose(1, 2)

    def _attend(self, query_side, key_side):
        q, _, _ = query_side.chunk(3, dim=-1)
        _, k, v = key_side.chunk(3, dim=-1)
        out = guidance_attention(self._heads(q), self._heads(k), self._heads(v), window=-1, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _update(self, a, attended):
        x = self.norm1(a + self.dropout(attended))
        return self.norm2(x + self.dropout(self.ffn(x)))

    def forward(self, ha, hb, pairs):
        ranks = (3,) if self.attention == "batch" else (3, 4)
        for name, stack in (("ha", ha), ("hb", hb)):
            if stack.dim() not in ranks or stack.shape[-1] != self.dim:
                shape = "(L, N, dim)" if self.attention == "batch" else "(L, N, dim) or (L, N, T, dim)"
                raise ValueError(f"SkewPairFusionBlock ({self.attention} mode): {name} must be {shape} with "
                                 f"dim={self.dim}, got {format_shape(stack.shape)}")
        if self.attention == "batch":
            return self._fuse_batch(ha, hb, pairs)
        return self._fuse_sample(ha, hb, pairs)

    def _fuse_batch(self, ha, hb, pairs):
        # Every pair is one attention batch entry whose sequence is the N samples.
        pa, pb = self.qkv(ha, hb, pairs)                                       # (P, N, 3 dim) each
        a, b = ha.index_select(0, pairs[:, 0]), hb.index_select(0, pairs[:, 1])
        x = self._update(a, self._attend(pa, pb))
        y = self._update(b, self._attend(pb, pa))
        return (x + y) / 2

    def _fuse_sample(self, ha, hb, pairs):
        if ha.dim() == 3:
            ha = ha.unsqueeze(2)
        if hb.dim() == 3:
            hb = hb.unsqueeze(2)
        if ha.shape[1] != hb.shape[1]:
            raise ValueError(f"SkewPairFusionBlock: ha and hb must hold the same N samples, got {ha.shape[1]} "
                             f"and {hb.shape[1]}")
        samples, tokens_a, tokens_b = ha.shape[1], ha.shape[2], hb.shape[2]
        tokens = max(tokens_a, tokens_b)
        # skew_pair_project takes (L, rows, E) stacks with the same rows for A and B: the shorter sequences
        # are zero-padded to the longer for the one projection call, and the padding is dropped before
        # attention (its projections are never read).
        rows_a = F.pad(ha, (0, 0, 0, tokens - tokens_a)).flatten(1, 2)
        rows_b = F.pad(hb, (0, 0, 0, tokens - tokens_b)).flatten(1, 2)
        pa, pb = self.qkv(rows_a, rows_b, pairs)                                # (P, N T, 3 dim) each
        num_pairs = pairs.shape[0]
        pa = pa.view(num_pairs * samples, tokens, -1)[:, :tokens_a]
        pb = pb.view(num_pairs * samples, tokens, -1)[:, :tokens_b]
        a = ha.index_select(0, pairs[:, 0]).flatten(0, 1)                       # (P N, Ta, dim)
        b = hb.index_select(0, pairs[:, 1]).flatten(0, 1)
        x = self._update(a, self._attend(pa, pb)).mean(dim=1)
        y = self._update(b, self._attend(pb, pa)).mean(dim=1)
        return ((x + y) / 2).view(num_pairs, samples, self.dim)


# 4. The model --------------------------------------------------------------------------------------------------

class SSFN(nn.Module):
    """SSFN(dim, heads, ffn_dim, classes, pairs=None, skew=None, num_pairs=1, layers=(12, 12), ...).

    The pair set is `pairs` ((P, 2) 0-based layer indices), or `skew_pairs(skew, num_pairs, *layers,
    anchor)` when `skew` is given instead. forward(ha, hb) -> (N, classes) logits: the mean over the pairs
    of `SkewPairFusionBlock(ha, hb, pairs)` and a linear head. ha, hb: the frozen encoders' stacks, dim
    features each (see the module docstring for the shapes of each attention mode). `backend` goes
    through to `skew_pair_project` and `guidance_attention`."""

    def __init__(self, dim, heads, ffn_dim, classes, pairs=None, skew=None, num_pairs=1, layers=(12, 12),
                 attention="batch", anchor="top", dropout=0.0, backend="auto"):
        super().__init__()
        if (pairs is None) == (skew is None):
            raise ValueError("SSFN: give either pairs or skew (with num_pairs), not both and not neither")
        if pairs is None:
            pairs = skew_pairs(skew, num_pairs, layers[0], layers[1], anchor=anchor)
        pairs = torch.as_tensor(pairs, dtype=torch.int64)
        if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.shape[0] < 1:
            raise ValueError(f"SSFN: pairs must be (P >= 1, 2) layer indices, got shape {format_shape(pairs.shape)}")
        self.register_buffer("pairs", pairs.clone())
        self.attention = attention
        self.block = SkewPairFusionBlock(dim, heads, ffn_dim, attention=attention, dropout=dropout, backend=backend)
        self.head = nn.Linear(dim, classes)

    def forward(self, ha, hb):
        return self.head(self.block(ha, hb, self.pairs).mean(dim=0))

    def extra_repr(self):
        return f"pairs={self.pairs.tolist()}, attention={self.attention!r}"
