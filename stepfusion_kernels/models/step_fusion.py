"""Step fusion (Xu, Zhang, Qin, Lu; arXiv 2306.16950) as a thin, complete model: one encoder per
modality, K alternating fusion steps in Gauss-Seidel order (A guided by B, then B guided by the
updated A), and a forecasting or a classification head.

Each half-step updates one modality x guided by the other modality g:
    context            = GuidanceAttention(x, g)                 per-position context from g (local + global)
    scale_l, shift_l   = Linear(context)                         per position, (B, Lx, D) each
    scale_g, shift_g   = Linear(mean_t g)                        per sample,   (B, D) each
    x                  = StepShiftExpand(x, scale_l, shift_l, scale_g, shift_g)
The step's gate starts at `gate_init` (small), so an untrained step is close to the identity map up to
its LayerNorm."""

import dataclasses

import torch
from torch import nn

from .._checks import format_shape
from ..nn import GuidanceAttention, StepShiftExpand

HEADS = ("forecast", "classify")


@dataclasses.dataclass
class StepFusionConfig:
    in_a: int                      # features per position of modality A
    in_b: int                      # features per position of modality B
    max_len_a: int                 # longest A sequence (sizes the learned positional embedding)
    max_len_b: int                 # longest B sequence
    head: str = "classify"         # "forecast" or "classify"
    dim: int = 32                  # model width of both modalities
    heads: int = 4                 # attention heads in the encoders and the guidance attention
    layers_a: int = 1              # Transformer encoder depth of modality A
    layers_b: int = 1              # Transformer encoder depth of modality B
    ffn_mult: int = 2              # encoder feed-forward width = ffn_mult * dim
    dropout: float = 0.1
    steps: int = 2                 # K fusion steps; 0 = no fusion
    share_steps: bool = False      # one set of fusion weights reused by every step
    window: int = 4                # guidance attention local half-width (-1: every key)
    global_tokens: int = 2         # guidance attention global tokens
    gate_init: float = 0.1         # initial step size of every StepShiftExpand
    eps: float = 1e-5
    horizon: int = 0               # forecast head: steps ahead
    out_vars: int = 1              # forecast head: variables predicted per step
    skip_len: int = 0              # forecast head: length of a raw window mapped to the horizon, one shared
                                   # linear map per variable, added to the fused-A forecast (0: none)
    num_classes: int = 0           # classification head
    classifier_hidden: int = 64    # classification MLP hidden width
    backend: str = "auto"          # passed through to the ops

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"StepFusionConfig: head must be one of {HEADS}, got {self.head!r}")
        if self.head == "forecast" and (self.horizon < 1 or self.out_vars < 1):
            raise ValueError(f"StepFusionConfig: a forecast head needs horizon >= 1 and out_vars >= 1, got "
                             f"horizon={self.horizon}, out_vars={self.out_vars}")
        if self.head == "classify" and self.num_classes < 2:
            raise ValueError(f"StepFusionConfig: a classify head needs num_classes >= 2, got {self.num_classes}")
        if self.steps < 0:
            raise ValueError(f"StepFusionConfig: steps must be >= 0, got {self.steps}")


class ModalityEncoder(nn.Module):
    """Value embedding + learned positional embedding + a small pre-norm Transformer encoder."""

    def __init__(self, in_features, max_len, layers, config):
        super().__init__()
        self.value = nn.Linear(in_features, config.dim)
        self.position = nn.Parameter(torch.zeros(max_len, config.dim))
        nn.init.normal_(self.position, std=config.dim ** -0.5)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(config.dim, config.heads, config.ffn_mult * config.dim, config.dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers else nn.Identity()

    def forward(self, x):
        if x.shape[1] > self.position.shape[0]:
            raise ValueError(f"sequence length {x.shape[1]} exceeds the configured maximum {self.position.shape[0]}")
        return self.encoder(self.dropout(self.value(x) + self.position[: x.shape[1]]))


class GuidedHalfStep(nn.Module):
    """x <- StepShiftExpand(x, guidance from g): local guidance through GuidanceAttention, global guidance
    from g's mean over time."""

    def __init__(self, config):
        super().__init__()
        self.attention = GuidanceAttention(config.dim, config.heads, window=config.window,
                                           global_tokens=config.global_tokens, backend=config.backend)
        self.local = nn.Linear(config.dim, 2 * config.dim)
        self.global_ = nn.Linear(config.dim, 2 * config.dim)
        self.step = StepShiftExpand(config.dim, eps=config.eps, gate_init=config.gate_init, backend=config.backend)

    def forward(self, x, guide):
        scale_local, shift_local = self.local(self.attention(x, guide)).chunk(2, dim=-1)
        scale_global, shift_global = self.global_(guide.mean(dim=1)).chunk(2, dim=-1)
        return self.step(x, scale_local.contiguous(), shift_local.contiguous(), scale_global.contiguous(),
                         shift_global.contiguous())


class FusionStep(nn.Module):
    """One full step in Gauss-Seidel order: A guided by B, then B guided by the updated A."""

    def __init__(self, config):
        super().__init__()
        self.a_from_b = GuidedHalfStep(config)
        self.b_from_a = GuidedHalfStep(config)

    def forward(self, a, b, update_b=True):
        a = self.a_from_b(a, b)
        return a, self.b_from_a(b, a) if update_b else b


class StepFusionNet(nn.Module):
    """forward(a (B, La, in_a), b (B, Lb, in_b), skip=None) ->
        forecast head: (B, horizon, out_vars), a linear map of the fused A tokens, plus, when
                       config.skip_len > 0, a linear map of `skip`, a raw (B, skip_len, out_vars) input
                       window, shared by the variables (the RLinear forecaster as a starting point);
        classify head: (B, num_classes) logits of an MLP on the time-pooled fused A and B, concatenated."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder_a = ModalityEncoder(config.in_a, config.max_len_a, config.layers_a, config)
        self.encoder_b = ModalityEncoder(config.in_b, config.max_len_b, config.layers_b, config)
        if config.share_steps and config.steps:
            shared = FusionStep(config)
            self.steps = nn.ModuleList([shared] * config.steps)
        else:
            self.steps = nn.ModuleList([FusionStep(config) for _ in range(config.steps)])
        # The forecast head reads A only: B's last half-step (and, with no steps, B's encoder) would have no
        # effect and its parameters no gradient, which DistributedDataParallel refuses. Each is made, so that
        # the random initialisation of what follows stays the same, and dropped.
        if config.head == "forecast" and not config.steps:
            self.encoder_b = None
        elif config.head == "forecast" and not (config.share_steps and config.steps > 1):
            self.steps[-1].b_from_a = None
        if config.head == "forecast":
            self.forecast = nn.Linear(config.max_len_a * config.dim, config.horizon * config.out_vars)
            self.skip = nn.Linear(config.skip_len, config.horizon) if config.skip_len else None
        else:
            self.classifier = nn.Sequential(
                nn.Linear(2 * config.dim, config.classifier_hidden), nn.GELU(), nn.Dropout(config.dropout),
                nn.Linear(config.classifier_hidden, config.num_classes))

    def fuse(self, a, b):
        """The encoded A and B after the K fusion steps. With a forecast head, which reads A only, B's last
        half-step is left out: B is returned as the step before left it (with no steps, as given)."""
        a = self.encoder_a(a)
        if self.encoder_b is not None:
            b = self.encoder_b(b)
        for index, step in enumerate(self.steps):
            last = index == len(self.steps) - 1
            a, b = step(a, b, update_b=not (last and self.config.head == "forecast"))
        return a, b

    def forward(self, a, b, skip=None):
        a, b = self.fuse(a, b)
        if self.config.head == "classify":
            return self.classifier(torch.cat([a.mean(dim=1), b.mean(dim=1)], dim=-1))
        if a.shape[1] != self.config.max_len_a:
            raise ValueError(f"the forecast head maps exactly max_len_a={self.config.max_len_a} A positions, "
                             f"got {a.shape[1]}")
        forecast = self.forecast(a.flatten(1)).view(a.shape[0], self.config.horizon, self.config.out_vars)
        if self.skip is None:
            return forecast
        if skip is None or skip.shape[1:] != (self.config.skip_len, self.config.out_vars):
            raise ValueError(f"skip must be (B, {self.config.skip_len}, {self.config.out_vars}), got "
                             f"{None if skip is None else format_shape(skip.shape)}")
        return forecast + self.skip(skip.transpose(1, 2)).transpose(1, 2)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())
