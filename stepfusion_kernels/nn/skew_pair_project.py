import math

import torch
from torch import nn

from ..ops.skew_pair_project import skew_pair_project


class SkewPairProjection(nn.Module):
    """The projection stage of skew-pair fusion (SSFN): maps layer i_k of modality A and layer j_k of
    modality B to a common space of out_features for every pair (see `stepfusion_kernels.skew_pair_project`).

    shared=True: one (F, E) weight and (F,) bias serve every pair and both modalities (SSFN's single
    fusion block). shared=False: separate per-pair weights for A and B, (P, F, E) each, which needs
    num_pairs. Initialised like nn.Linear. forward(ha, hb, pairs) -> (pa, pb), each (P, N, F)."""

    def __init__(self, in_features, out_features, shared=True, num_pairs=None, bias=True, backend="auto",
                 device=None, dtype=None):
        super().__init__()
        if not shared and (not isinstance(num_pairs, int) or isinstance(num_pairs, bool) or num_pairs < 1):
            raise ValueError(f"SkewPairProjection: shared=False needs num_pairs >= 1, got {num_pairs!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.shared = shared
        self.num_pairs = None if shared else num_pairs
        self.backend = backend
        lead = () if shared else (num_pairs,)
        sides = ("a",) if shared else ("a", "b")
        for side in sides:
            self.register_parameter(f"weight_{side}", nn.Parameter(torch.empty(*lead, out_features, in_features,
                                                                               **factory)))
            self.register_parameter(f"bias_{side}",
                                    nn.Parameter(torch.empty(*lead, out_features, **factory)) if bias else None)
        if shared:
            self.weight_b = None
            self.bias_b = None
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's default: U(-1/sqrt(E), 1/sqrt(E)) for the weight (kaiming_uniform, a=sqrt(5)) and bias.
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
        for param in (self.weight_a, self.bias_a, self.weight_b, self.bias_b):
            if param is not None:
                nn.init.uniform_(param, -bound, bound)

    def forward(self, ha, hb, pairs):
        return skew_pair_project(ha, hb, pairs, self.weight_a, self.bias_a, self.weight_b, self.bias_b,
                                 backend=self.backend)

    def extra_repr(self):
        pairs = "shared=True" if self.shared else f"shared=False, num_pairs={self.num_pairs}"
        return (f"{self.in_features}, {self.out_features}, {pairs}, bias={self.bias_a is not None}, "
                f"backend={self.backend!r}")
