import torch
from torch import nn

from ..ops.shift_expand import shift_expand


class StepShiftExpand(nn.Module):
    """One step of Step fusion over D channels: owns the per-channel gate and the LayerNorm weight and
    bias, and takes the guidance of the other modality at call time (see `stepfusion_kernels.shift_expand`).

    gate_init sets the initial step size (a small value starts the step near the identity map up to the
    LayerNorm)."""

    def __init__(self, dim, eps=1e-5, gate_init=1.0, backend="auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.eps = eps
        self.backend = backend
        self.gate = nn.Parameter(torch.full((dim,), float(gate_init), **factory))
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        self.bias = nn.Parameter(torch.zeros(dim, **factory))

    def forward(self, x, scale_local=None, shift_local=None, scale_global=None, shift_global=None):
        return shift_expand(x, scale_local, shift_local, scale_global, shift_global, gate=self.gate,
                            weight=self.weight, bias=self.bias, eps=self.eps, backend=self.backend)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}, backend={self.backend!r}"
