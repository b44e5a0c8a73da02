"""Benchmark workloads of `skew_pair_project` on SSFN-like shapes (L = 12 layers per modality, one fusion
block shared by both modalities, E = 768 -> F = 2304): our backends against the eager loop a user would
write (per pair: index_select the layer, a linear layer; then stack), torch.compile of that loop, the
batched "gather + linear" (ha.index_select(0, pairs[:, 0]) as one (P, N, E) copy, then one GEMM per
modality), and on the GPU one dense GEMM of the same FLOPs (all 2P N rows at once: the ceiling a grouped
GEMM can reach). Our backends get the pairs on the CPU, as the op's docstring advises (no device-to-host
copy and wait per call); the baselines index with them on the device. TFLOP/s counts 2 N E F per
product (x3 with the backward); peak memory shows what the gathered copies cost."""

import torch
import torch.nn.functional as F

from .. import backends
from ..ops.skew_pair_project import skew_pair_project, skew_pairs
from ._harness import COMPILE, EAGER, FORWARD, FORWARD_BACKWARD, BenchCase

LAYERS = 12
# (N, E, F, P) per device; the CPU ones finish the whole run in well under a minute.
SHAPES = {
    "cpu": [(64, 768, 2304, 1), (32, 768, 2304, 6), (256, 256, 512, 12)],
    "cuda": [(16, 768, 2304, 1), (4096, 768, 2304, 1), (256, 768, 2304, 12), (4096, 768, 2304, 12)],
}
DTYPES = {"cpu": [torch.float32], "cuda": [torch.float32, torch.bfloat16]}
DENSE = "dense GEMM"
GATHER = "gather+linear"


def index_select_loop(ha, hb, pairs, weight, bias, **_):
    """The eager baseline: one index_select and one linear layer per pair and modality."""
    pa = [F.linear(ha.index_select(0, pairs[k:k + 1, 0]), weight, bias) for k in range(pairs.shape[0])]
    pb = [F.linear(hb.index_select(0, pairs[k:k + 1, 1]), weight, bias) for k in range(pairs.shape[0])]
    return torch.cat(pa), torch.cat(pb)


def gather_linear(ha, hb, pairs, weight, bias, **_):
    """Gathered (P, N, E) copies of the paired layers, then one linear layer per modality."""
    return F.linear(ha.index_select(0, pairs[:, 0]), weight, bias), F.linear(hb.index_select(0, pairs[:, 1]),
                                                                             weight, bias)


def dense_gemm(dense_rows, weight, bias, **_):
    return F.linear(dense_rows, weight, bias)


def _ours(backend):
    def project(ha, hb, pairs_host, weight, bias, **_):
        return skew_pair_project(ha, hb, pairs_host, weight, bias, backend=backend)

    return project


def _pairs_for(num_pairs):
    # SSFN's skew of 2 where the run fits in the stacks, else aligned pairs (late fusion, repeated down).
    return skew_pairs(2 if num_pairs <= LAYERS - 2 else 0, num_pairs, LAYERS, LAYERS)


def _inputs(samples, in_features, out_features, num_pairs, device, dtype):
    def make():
        def t(*shape, scale=1.0):
            return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

        pairs = _pairs_for(num_pairs)
        kwargs = {"ha": t(LAYERS, samples, in_features), "hb": t(LAYERS, samples, in_features),
                  "pairs": pairs.to(device), "pairs_host": pairs,
                  "weight": t(out_features, in_features, scale=in_features ** -0.5), "bias": t(out_features)}
        if device == "cuda":
            kwargs["dense_rows"] = t(2 * num_pairs * samples, in_features)
        return kwargs

    return make


def cases(device, shapes=None):
    contenders = {EAGER: index_select_loop, COMPILE: torch.compile(index_select_loop), GATHER: gather_linear}
    for backend in backends():
        if backend in (("cpu",) if device == "cpu" else ("cuda", "triton")):
            contenders[backend] = _ours(backend)
    if device == "cuda":
        contenders[DENSE] = dense_gemm
    result = []
    for dtype in DTYPES[device]:
        for samples, in_features, out_features, num_pairs in shapes or SHAPES[device]:
            products = 2 * num_pairs * 2 * samples * in_features * out_features
            result.append(BenchCase(
                op="skew_pair_project", label=f"L{LAYERS} N{samples} E{in_features} F{out_features} P{num_pairs}",
                device=device, dtype=dtype,
                make_inputs=_inputs(samples, in_features, out_features, num_pairs, device, dtype),
                contenders=dict(contenders),
                # backward: d_h and d_weight, each as many FLOPs as the forward.
                flops={FORWARD: products, FORWARD_BACKWARD: 3 * products},
                peak_memory=True,
            ))
    return result
