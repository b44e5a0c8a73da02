import pytest
import torch

import python_ref
import stepfusion_kernels as sk
from harness import (HAS_CUDA, KERNELS, NEEDS_GPU, Case, OpUnderTest, backend_dtype_params, backend_params,
                     check_against_reference, check_auto_runs_the_reference, check_backend_selection_errors,
                     check_deterministic_backward, check_double_backward_raises, check_empty, check_torch_func,
                     host_backends, kernel_op_params, randn, seeded_generator)

OP = OpUnderTest(fn=sk.skew_pair_project, ref=python_ref.skew_pair_project)
REPEATED = ((0, 1), (4, 3), (0, 1), (2, 0), (4, 1))  # pair 0 and 2 repeat; A layer 4 and B layer 1 twice


def make_case(layers_a, layers_b, samples, in_features, out_features, pairs=REPEATED, per_pair=False,
              separate_b=False, bias_a=True, bias_b=True, noncontiguous=(), name=None):
    pairs = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    num_pairs = pairs.shape[0]
    lead = (num_pairs,) if per_pair else ()

    def build(generator):
        return {"ha": randn(generator, layers_a, samples, in_features),
                "hb": randn(generator, layers_b, samples, in_features),
                "pairs": pairs,
                "weight_a": randn(generator, *lead, out_features, in_features),
                "bias_a": randn(generator, *lead, out_features) if bias_a else None,
                "weight_b": randn(generator, *lead, out_features, in_features) if separate_b else None,
                "bias_b": randn(generator, *lead, out_features) if separate_b and bias_b else None}

    label = name or (f"LA{layers_a}-LB{layers_b}-N{samples}-E{in_features}-F{out_features}-P{num_pairs}"
                     + ("-perpair" if per_pair else "-shared") + ("-sepB" if separate_b else "")
                     + ("" if bias_a else "-nobiasA") + ("" if bias_b or not separate_b else "-nobiasB"))
    if noncontiguous:
        label += "-strided"
    return Case(label, build, tuple(noncontiguous))


CASES = [
    make_case(5, 4, 17, 33, 9),                                    # SSFN: weight_b=None shares weight_a and bias_a
    make_case(5, 4, 17, 33, 9, bias_a=False),
    make_case(5, 4, 17, 33, 9, separate_b=True),
    make_case(5, 4, 17, 33, 9, separate_b=True, bias_b=False),     # only A has a bias
    make_case(5, 4, 17, 33, 9, separate_b=True, bias_a=False),     # only B has a bias
    make_case(5, 4, 17, 33, 9, per_pair=True),
    make_case(5, 4, 17, 33, 9, per_pair=True, separate_b=True, bias_a=False),
    make_case(3, 3, 1, 17, 65, pairs=((2, 2),)),                   # N = 1, E and F = 2^k + 1
    make_case(2, 6, 9, 1, 1, pairs=((1, 5), (0, 0))),              # E = F = 1
    make_case(12, 12, 16, 40, 24, pairs=tuple(map(tuple, sk.skew_pairs(-7, 5, 12, 12).tolist())),
              name="SSFN-L12-skew-7-n5"),
    make_case(5, 4, 17, 33, 9, separate_b=True, noncontiguous=("ha", "hb", "weight_a", "bias_b")),
    make_case(5, 4, 17, 33, 9, per_pair=True, noncontiguous=("ha", "weight_a", "bias_a")),
    make_case(2, 3, 130, 20, 12, pairs=((1, 2), (1, 0), (0, 2))),  # more rows than one CPU task block
    # Sides whose layers step evenly: up and down, per-pair weights and biases; a repeated layer (step 0)
    # beside an uneven side; steps of 2 and 1 with A's bias only; per-pair biases of an odd F.
    make_case(6, 6, 17, 33, 16, pairs=((1, 5), (2, 4), (3, 3)), per_pair=True),
    make_case(4, 4, 17, 33, 16, pairs=((2, 0), (2, 3), (2, 1)), separate_b=True),
    make_case(5, 3, 17, 33, 16, pairs=((0, 0), (2, 1), (4, 2)), separate_b=True, bias_b=False),
    make_case(3, 3, 17, 33, 9, pairs=((0, 2), (1, 1)), per_pair=True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_params())
def test_matches_reference(case, backend, device, dtype):
    check_against_reference(OP, case, backend, device, dtype)


@NEEDS_GPU
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_own_grouped_gemm_matches_reference(case, dtype, monkeypatch):
    # The CUDA backend runs its products on cuBLASLt; STEPFUSION_SKEW_BLASLT=0 selects its own grouped GEMM
    # kernel, the fallback for problems cuBLASLt has no algorithm for, which must agree as well.
    monkeypatch.setenv("STEPFUSION_SKEW_BLASLT", "0")
    check_against_reference(OP, case, "cuda", "cuda", dtype)


# The opt-in variants of the CUDA backend's cuBLASLt path (see csrc/cuda/skew_pair_project.cpp). Their tests
# carry "blaslt_variant" in their names: scripts/gpu_check.sh runs them in a stage of their own, so that a
# variant cuBLASLt mishandles cannot take the rest of the GPU suite down with it.
BLASLT_VARIANTS = {
    "forward-strided": {"STEPFUSION_SKEW_FORWARD": "strided"},
    "forward-pairs": {"STEPFUSION_SKEW_FORWARD": "pairs"},
    "groups-auto": {"STEPFUSION_SKEW_WEIGHT_GROUPS": "auto"},
    "groups-2": {"STEPFUSION_SKEW_WEIGHT_GROUPS": "2"},  # 5 pairs: 10 terms as 5 + 5, or 5 as 2 + 3 with weight_b
    "strided-groups-3": {"STEPFUSION_SKEW_FORWARD": "strided", "STEPFUSION_SKEW_WEIGHT_GROUPS": "3"},
}


@NEEDS_GPU
@pytest.mark.parametrize("variant", BLASLT_VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_blaslt_variant_matches_reference(case, dtype, variant, monkeypatch):
    for name, value in BLASLT_VARIANTS[variant].items():
        monkeypatch.setenv(name, value)
    check_against_reference(OP, case, "cuda", "cuda", dtype)


@NEEDS_GPU
@pytest.mark.parametrize("variant", BLASLT_VARIANTS)
@pytest.mark.parametrize("per_pair", [False, True], ids=["shared", "perpair"])
def test_cuda_blaslt_variant_backward_is_bitwise_reproducible(per_pair, variant, monkeypatch):
    for name, value in BLASLT_VARIANTS[variant].items():
        monkeypatch.setenv(name, value)
    pairs = ((0, 1), (1, 1), (0, 1), (0, 0), (1, 1), (0, 2))
    check_deterministic_backward(OP, make_case(2, 3, 150, 24, 20, pairs=pairs, per_pair=per_pair), "cuda", "cuda",
                                 torch.bfloat16)


BAD_SETTINGS = [("STEPFUSION_SKEW_WEIGHT_GROUPS", value) for value in ("0", "-2", "two", "2x", "")]
BAD_SETTINGS.append(("STEPFUSION_SKEW_FORWARD", "strides"))


@NEEDS_GPU
@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS)
@pytest.mark.parametrize("per_pair", [False, True], ids=["shared", "perpair"])
def test_cuda_blaslt_variant_bad_setting_names_the_variable(name, value, per_pair, monkeypatch):
    inputs = make_case(5, 4, 17, 33, 9, per_pair=per_pair).build(seeded_generator("bad-setting"))
    tensors = {key: t.cuda().float().requires_grad_() for key, t in inputs.items()
               if key != "pairs" and t is not None}
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=f"{name} must be"):
        pa, pb = sk.skew_pair_project(pairs=inputs["pairs"], backend="cuda", **tensors)
        (pa.sum() + pb.sum()).backward()


@NEEDS_GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("per_pair", [False, True], ids=["shared", "perpair"])
def test_cuda_inputs_take_pairs_on_the_cpu(backend, per_pair):
    # pairs may stay on the CPU (no device-to-host copy per call); values and gradients are unchanged.
    inputs = make_case(5, 4, 17, 33, 9, per_pair=per_pair, separate_b=True).build(seeded_generator("cpu-pairs"))
    names = ["ha", "hb", "weight_a", "bias_a", "weight_b", "bias_b"]
    ours = {name: inputs[name].float().cuda().requires_grad_() for name in names}
    reference = {name: inputs[name].clone().requires_grad_() for name in names}
    pa, pb = sk.skew_pair_project(pairs=inputs["pairs"], backend=backend, **ours)
    ra, rb = python_ref.skew_pair_project(pairs=inputs["pairs"], **reference)
    torch.testing.assert_close(pa.double().cpu(), ra, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pb.double().cpu(), rb, rtol=1e-4, atol=1e-4)
    grad_a, grad_b = torch.randn_like(ra), torch.randn_like(rb)
    torch.autograd.backward((pa, pb), (grad_a.float().cuda(), grad_b.float().cuda()))
    torch.autograd.backward((ra, rb), (grad_a, grad_b))
    for name in names:
        torch.testing.assert_close(ours[name].grad.double().cpu(), reference[name].grad, rtol=1e-4, atol=1e-3)


# The Triton backend's TMA kernels (STEPFUSION_SKEW_TRITON_TMA=1) take rows of a multiple of 16 bytes in
# every dtype: E and F multiples of 8. N stays ragged against every tile.
TMA_CASES = [
    make_case(5, 4, 17, 32, 24),
    make_case(5, 4, 17, 32, 24, bias_a=False),
    make_case(5, 4, 17, 32, 24, separate_b=True, bias_b=False),
    make_case(5, 4, 17, 32, 24, per_pair=True),
    make_case(5, 4, 17, 32, 24, per_pair=True, separate_b=True, bias_a=False),
    make_case(3, 3, 1, 8, 72, pairs=((2, 2),)),
    make_case(12, 12, 33, 40, 16, pairs=tuple(map(tuple, sk.skew_pairs(-7, 5, 12, 12).tolist())),
              name="SSFN-L12-skew-7-n5-tma"),
    make_case(5, 4, 17, 32, 24, separate_b=True, noncontiguous=("ha", "hb", "weight_a", "bias_b")),
]
# On a GPU the TMA kernels take fp16 and bf16 (fp32 keeps the pointer kernels' full-precision dots).
TMA_PARAMS = [p for p in backend_dtype_params()
              if p.values[0] == "triton" and (p.values[1] == "cpu" or p.values[2] != torch.float32)]


@pytest.fixture
def triton_tma(monkeypatch):
    """The Triton backend with its TMA kernels asked for, and its pointer kernels made to fail if they run."""
    from stepfusion_kernels.triton import skew_pair_project as kernels

    if HAS_CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernels need compute capability 9 or newer")
    monkeypatch.setenv(kernels.TMA_SETTING, "1")

    def pointer_launch(*args, **kwargs):
        raise AssertionError("a pointer kernel ran where the TMA kernels should have")

    monkeypatch.setattr(kernels, "_launch", pointer_launch)


@pytest.mark.parametrize("case", TMA_CASES, ids=str)
@pytest.mark.parametrize(("backend", "device", "dtype"), TMA_PARAMS)
def test_triton_tma_kernels_match_reference(case, backend, device, dtype, triton_tma):
    check_against_reference(OP, case, backend, device, dtype)


@pytest.mark.parametrize("per_pair", [False, True], ids=["shared", "perpair"])
@pytest.mark.parametrize(("backend", "device", "dtype"), [p for p in TMA_PARAMS if p.values[2] == torch.bfloat16])
def test_triton_tma_backward_is_bitwise_reproducible(per_pair, backend, device, dtype, triton_tma):
    # A shared weight's d_weight adds float32 partials of split pairs: in a fixed order.
    pairs = ((0, 1), (1, 1), (0, 1), (0, 0), (1, 1), (0, 2))
    check_deterministic_backward(OP, make_case(2, 3, 150, 24, 16, pairs=pairs, per_pair=per_pair), backend, device,
                                 dtype)


@pytest.mark.skipif("triton" not in sk.backends() or HAS_CUDA, reason="checks the interpreter's choice (CPU)")
def test_triton_tma_only_where_it_can_run(monkeypatch):
    from stepfusion_kernels.triton import skew_pair_project as kernels

    stack = torch.zeros(3, 17, 32)
    assert not kernels.use_tma((stack,), (32, 24))  # not asked for
    monkeypatch.setenv(kernels.TMA_SETTING, "1")
    assert kernels.use_tma((stack,), (32, 24))
    assert kernels.use_tma((stack.bfloat16(),), (8, 16))
    assert not kernels.use_tma((stack,), (32, 6))                # F rows of 24 bytes
    assert not kernels.use_tma((stack.bfloat16(),), (12, 16))   # E rows of 24 bytes
    assert not kernels.use_tma((stack,), (32, 0))                # nothing to tile
    assert not kernels.use_tma((stack, stack.flatten()[1:]), (32, 24))  # a tensor 4 bytes off alignment
    # Such a call runs the pointer kernels, and still gets the reference's answer.
    ha = torch.randn(3 * 17 * 32 + 1)[1:].view(3, 17, 32)
    hb, weight, pairs = torch.randn(2, 17, 32), torch.randn(24, 32), torch.tensor([[2, 0], [0, 1]])
    pa, pb = sk.skew_pair_project(ha, hb, pairs, weight, backend="triton")
    ra, rb = python_ref.skew_pair_project(ha.double(), hb.double(), pairs, weight.double())
    torch.testing.assert_close(pa.double(), ra, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pb.double(), rb, rtol=1e-5, atol=1e-5)


# Wide enough rows that the CPU kernel's shared-weight path runs several row tiles (2 MiB each in fp32 and
# fp64): tiles that start inside a pair's rows, gathered tiles, and tiles read or written in place (runs of
# consecutive layers, e.g. the A layers in use 0..4 and the pairs k = 3..7 on A, k = 0..3 on B).
TILED = [make_case(8, 6, 70, 1000, 7, pairs=((7, 0), (4, 1), (7, 2), (0, 3), (1, 3), (2, 5), (3, 4), (4, 4)),
                   separate_b=separate_b, name="tiled" + ("-sepB" if separate_b else "-shared"))
         for separate_b in (False, True)]


@pytest.mark.parametrize("case", TILED, ids=str)
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_params(only=("cpu",)))
def test_cpu_row_tiles_match_reference(case, backend, device, dtype):
    check_against_reference(OP, case, backend, device, dtype)


EMPTY = [
    ("P0-shared", (3, 2, 4, 5, 6), 0, False),
    ("P0-perpair", (3, 2, 4, 5, 6), 0, True),
    ("N0", (3, 2, 0, 5, 6), 2, False),
    ("F0", (3, 2, 4, 5, 0), 2, True),
    ("LA0-P0", (0, 2, 4, 5, 6), 0, False),
]


@pytest.mark.parametrize(("shape", "num_pairs", "per_pair"), [e[1:] for e in EMPTY], ids=[e[0] for e in EMPTY])
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_empty_inputs_give_empty_outputs(shape, num_pairs, per_pair, backend, device):
    layers_a, layers_b, samples, in_features, out_features = shape
    lead = (num_pairs,) if per_pair else ()
    kwargs = {"ha": torch.randn(layers_a, samples, in_features), "hb": torch.randn(layers_b, samples, in_features),
              "pairs": torch.zeros(num_pairs, 2, dtype=torch.int64),
              "weight_a": torch.randn(*lead, out_features, in_features), "bias_a": torch.randn(*lead, out_features)}
    check_empty(OP, kwargs, backend, device)


def test_zero_in_features_give_the_bias():
    ha, hb = torch.randn(2, 3, 0), torch.randn(2, 3, 0)
    bias = torch.randn(4)
    for backend in host_backends("cpu", "triton"):
        pa, pb = sk.skew_pair_project(ha, hb, torch.tensor([[1, 0]]), torch.randn(4, 0), bias, backend=backend)
        torch.testing.assert_close(pa, bias.expand(1, 3, 4), rtol=0, atol=0)
        torch.testing.assert_close(pb, bias.expand(1, 3, 4), rtol=0, atol=0)


@pytest.mark.parametrize("per_pair", [False, True], ids=["shared", "perpair"])
@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
def test_backward_is_bitwise_reproducible(per_pair, backend, device):
    pairs = ((0, 1), (1, 1), (0, 1), (0, 0), (1, 1), (0, 2))  # layers hit by up to three pairs
    case = make_case(2, 3, 150, 24, 20, pairs=pairs, per_pair=per_pair)
    check_deterministic_backward(OP, case, backend, device, torch.float32)


@pytest.mark.parametrize("per_pair", [False, True])
@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
def test_double_backward_raises(per_pair, backend, device):
    check_double_backward_raises(OP, make_case(2, 3, 5, 8, 6, pairs=((0, 1), (1, 0)), per_pair=per_pair), backend,
                                 device)


@pytest.mark.parametrize("case", [make_case(3, 2, 5, 8, 6, pairs=((0, 1), (2, 0), (0, 1)), noncontiguous=("hb",)),
                                  make_case(2, 3, 4, 8, 6, pairs=((1, 2),), per_pair=True, separate_b=True,
                                            bias_a=False)], ids=str)
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_torch_func_transforms(case, backend, device):
    check_torch_func(OP, case, backend, device)


@NEEDS_GPU
def test_cuda_own_grouped_gemm_backward_is_bitwise_reproducible(monkeypatch):
    monkeypatch.setenv("STEPFUSION_SKEW_BLASLT", "0")
    pairs = ((0, 1), (1, 1), (0, 1), (0, 0), (1, 1), (0, 2))
    check_deterministic_backward(OP, make_case(2, 3, 150, 24, 20, pairs=pairs), "cuda", "cuda", torch.float32)


def test_gradient_of_a_repeated_layer_is_the_sum_over_its_pairs():
    generator = seeded_generator("repeat")
    ha, hb = randn(generator, 2, 5, 6).requires_grad_(), randn(generator, 2, 5, 6).requires_grad_()
    weight = randn(generator, 3, 6)
    for backend in host_backends("cpu", "triton"):
        dtype = torch.float64 if backend == "cpu" else torch.float32
        h_a, h_b = ha.detach().to(dtype).requires_grad_(), hb.detach().to(dtype).requires_grad_()
        pa, pb = sk.skew_pair_project(h_a, h_b, torch.tensor([[1, 0], [1, 0], [1, 1]]), weight.to(dtype),
                                      backend=backend)
        (pa.sum() + pb.sum()).backward()
        column = weight.to(dtype).sum(0).expand(5, 6)
        torch.testing.assert_close(h_a.grad[1], 3 * column)
        torch.testing.assert_close(h_a.grad[0], torch.zeros_like(column), rtol=0, atol=0)
        torch.testing.assert_close(h_b.grad[0], 2 * column)
        torch.testing.assert_close(h_b.grad[1], column)


def _op_samples(dtype, device="cpu", E=7, F=4):
    generator = seeded_generator("opcheck")

    def t(*shape):
        return randn(generator, *shape).to(device=device, dtype=dtype).requires_grad_()

    pairs = torch.tensor([[0, 1], [2, 1], [0, 0]], device=device)
    shared = (t(3, 5, E), t(2, 5, E), pairs, t(F, E), t(F), None, None)
    separate = (t(3, 5, E), t(2, 5, E), pairs, t(F, E), None, t(F, E), t(F))
    per_pair = (t(3, 5, E), t(2, 5, E), pairs, t(3, F, E), t(3, F), t(3, F, E), None)
    per_pair_shared = (t(3, 2, E), t(2, 2, E), pairs, t(3, F, E), None, None, None)
    return [shared, separate, per_pair, per_pair_shared]


@pytest.mark.parametrize(("op", "device", "dtype"), kernel_op_params("skew_pair_project"))
def test_opcheck(op, device, dtype):
    for args in _op_samples(dtype, device):
        torch.library.opcheck(op, args)


@pytest.mark.skipif("triton" not in sk.backends() and not HAS_CUDA, reason="triton is not usable here")
def test_opcheck_triton_tma_kernels(triton_tma):
    # On a GPU the TMA kernels take fp16 and bf16 only; E = F = 8 makes 16-byte rows in either dtype.
    device, dtype = ("cuda", torch.bfloat16) if HAS_CUDA else ("cpu", torch.float32)
    for args in _op_samples(dtype, device, E=8, F=8):
        torch.library.opcheck(torch.ops.stepfusion.skew_pair_project_triton.default, args)


@pytest.mark.parametrize("per_pair", [False, True], ids=["shared", "perpair"])
@pytest.mark.parametrize("separate_b", [False, True], ids=["weightB-None", "weightB"])
def test_gradcheck_cpu_float64(per_pair, separate_b):
    generator = seeded_generator("gradcheck", per_pair, separate_b)
    lead = (3,) if per_pair else ()
    pairs = torch.tensor([[1, 0], [1, 2], [0, 0]])
    tensors = [randn(generator, *shape).requires_grad_()
               for shape in ((2, 4, 5), (3, 4, 5), (*lead, 3, 5), (*lead, 3))]
    if separate_b:
        tensors += [randn(generator, *lead, 3, 5).requires_grad_(), randn(generator, *lead, 3).requires_grad_()]

    def project(ha, hb, weight_a, bias_a, weight_b=None, bias_b=None):
        return sk.skew_pair_project(ha, hb, pairs, weight_a, bias_a, weight_b, bias_b, backend="cpu")

    assert torch.autograd.gradcheck(project, tensors)


@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
def test_torch_compile_fullgraph(backend, device):
    generator = seeded_generator("compile", backend)
    ha, hb, weight, bias = [randn(generator, *shape).float().to(device).requires_grad_()
                            for shape in ((4, 6, 8), (3, 6, 8), (5, 8), (5,))]
    pairs = sk.skew_pairs(1, 2, 4, 3)  # on the CPU, also with CUDA inputs: the documented fast path

    def fuse(ha, hb, weight, bias):
        pa, pb = sk.skew_pair_project(ha, hb, pairs, weight, bias, backend=backend)
        return (pa * pb).sum(-1)

    compiled = torch.compile(fuse, fullgraph=True)
    args = (ha, hb, weight, bias)
    expected = fuse(*args)
    result = compiled(*args)
    torch.testing.assert_close(result, expected)
    grads = torch.autograd.grad(result.square().sum(), args)
    expected_grads = torch.autograd.grad(expected.square().sum(), args)
    for grad, expected_grad in zip(grads, expected_grads):
        # Inductor fuses the ops around the kernel's in another order: fp32 rounding, not the kernel.
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


# skew_pairs: SSFN's pair sets (0-based layers, layer L-1 the deepest).
SKEW_PAIRS = [
    ((2, 1, 12, 12, "top"), [(11, 9)]),
    ((-7, 5, 12, 12, "top"), [(4, 11), (3, 10), (2, 9), (1, 8), (0, 7)]),
    ((0, 1, 12, 12, "top"), [(11, 11)]),                                    # late fusion
    ((0, 3, 4, 6, "top"), [(3, 5), (2, 4), (1, 3)]),
    ((2, 3, 12, 12, "bottom"), [(2, 0), (3, 1), (4, 2)]),
    ((-3, 2, 12, 12, "bottom"), [(0, 3), (1, 4)]),
    ((11, 1, 12, 12, "top"), [(11, 0)]),
    ((-11, 1, 12, 12, "bottom"), [(0, 11)]),
    ((5, 0, 12, 12, "top"), []),
]


@pytest.mark.parametrize(("args", "expected"), SKEW_PAIRS, ids=[str(s[0]) for s in SKEW_PAIRS])
def test_skew_pairs(args, expected):
    pairs = sk.skew_pairs(*args[:4], anchor=args[4])
    assert pairs.dtype == torch.int64 and pairs.shape == (len(expected), 2)
    assert [tuple(p) for p in pairs.tolist()] == expected


BAD_SKEW_PAIRS = [
    ("runs past the bottom", (2, 11, 12, 12), {}, "leave the stacks"),
    ("runs past the top", (2, 11, 12, 12), {"anchor": "bottom"}, "leave the stacks"),
    ("skew larger than the stack", (12, 1, 12, 12), {}, "leave the stacks"),
    ("negative count", (0, -1, 12, 12), {}, "num_pairs"),
    ("float skew", (1.0, 1, 12, 12), {}, "skew"),
    ("no layers", (0, 1, 0, 12), {}, "layers_a"),
    ("unknown anchor", (0, 1, 12, 12), {"anchor": "middle"}, "anchor"),
]


@pytest.mark.parametrize(("args", "kwargs", "match"), [b[1:] for b in BAD_SKEW_PAIRS],
                         ids=[b[0] for b in BAD_SKEW_PAIRS])
def test_skew_pairs_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sk.skew_pairs(*args, **kwargs)


def test_module_matches_functional_and_trains():
    generator = seeded_generator("module")
    ha, hb = randn(generator, 6, 4, 10).float(), randn(generator, 5, 4, 10).float()
    pairs = sk.skew_pairs(1, 3, 6, 5)
    shared = sk.nn.SkewPairProjection(10, 7)
    assert shared.weight_b is None and shared.bias_b is None and shared.weight_a.shape == (7, 10)
    per_pair = sk.nn.SkewPairProjection(10, 7, shared=False, num_pairs=3)
    assert per_pair.weight_a.shape == (3, 7, 10) and per_pair.bias_b.shape == (3, 7)
    for module in (shared, per_pair):
        pa, pb = module(ha, hb, pairs)
        expected = python_ref.skew_pair_project(ha, hb, pairs, module.weight_a, module.bias_a, module.weight_b,
                                                module.bias_b)
        torch.testing.assert_close((pa, pb), expected)
        (pa * pb).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert "num_pairs=3" in repr(per_pair)
    with pytest.raises(ValueError, match="num_pairs"):
        sk.nn.SkewPairProjection(10, 7, shared=False)


# Bad inputs: every message must name the argument at fault.
def _good(dtype=torch.float32):
    return {"ha": torch.randn(4, 3, 5, dtype=dtype), "hb": torch.randn(3, 3, 5, dtype=dtype),
            "pairs": torch.tensor([[3, 2], [0, 0]]), "weight_a": torch.randn(6, 5, dtype=dtype),
            "bias_a": torch.randn(6, dtype=dtype)}


BAD_INPUTS = [
    ("i out of range", {"pairs": torch.tensor([[4, 0]])}, ValueError, r"pairs\[:, 0\]"),
    ("j out of range", {"pairs": torch.tensor([[0, 3]])}, ValueError, r"pairs\[:, 1\]"),
    ("negative index", {"pairs": torch.tensor([[0, -1]])}, ValueError, r"pairs\[:, 1\]"),
    ("float pairs", {"pairs": torch.tensor([[0.0, 1.0]])}, ValueError, "pairs"),
    ("int32 pairs", {"pairs": torch.tensor([[0, 1]], dtype=torch.int32)}, ValueError, "pairs"),
    ("pairs not (P, 2)", {"pairs": torch.tensor([[0, 1, 2]])}, ValueError, "pairs"),
    ("pairs rank 1", {"pairs": torch.tensor([0, 1])}, ValueError, "pairs"),
    ("pairs device", {"pairs": torch.zeros(1, 2, dtype=torch.int64, device="meta")}, RuntimeError, "pairs"),
    ("ha rank", {"ha": torch.randn(4, 5)}, ValueError, "ha"),
    ("N mismatch", {"hb": torch.randn(3, 4, 5)}, ValueError, "hb"),
    ("E mismatch of hb", {"hb": torch.randn(3, 3, 6)}, ValueError, "hb"),
    ("in-feature mismatch", {"weight_a": torch.randn(6, 4)}, ValueError, "weight_a"),
    ("weight rank", {"weight_a": torch.randn(5)}, ValueError, "weight_a"),
    ("per-pair count != P", {"weight_a": torch.randn(3, 6, 5), "bias_a": None}, ValueError, "weight_a"),
    ("bias shape", {"bias_a": torch.randn(7)}, ValueError, "bias_a"),
    ("per-pair bias with shared weight", {"bias_a": torch.randn(2, 6)}, ValueError, "bias_a"),
    ("weight_b shape", {"weight_b": torch.randn(2, 6, 5)}, ValueError, "weight_b"),
    ("bias_b without weight_b", {"bias_b": torch.randn(6)}, ValueError, "bias_b"),
    ("dtype mix", {"hb": torch.randn(3, 3, 5, dtype=torch.float64)}, ValueError, "hb"),
    ("integer ha", {"ha": torch.ones(4, 3, 5, dtype=torch.int64)}, ValueError, "ha"),
    ("weight device", {"weight_a": torch.randn(6, 5, device="meta")}, RuntimeError, "weight_a"),
    ("not a tensor", {"weight_b": [[0.0] * 5] * 6}, ValueError, "weight_b"),
]


@pytest.mark.parametrize(("change", "error", "name"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(change, error, name):
    kwargs = {**_good(), **change}
    with pytest.raises(error, match=name):
        sk.skew_pair_project(**kwargs, backend="auto")


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", host_backends("reference", "cpu", "triton"))
def test_compiled_graph_still_checks_the_pairs(backend, dynamic):
    # A compiled graph cannot read the pairs while it is traced: every backend checks their range at run time
    # instead (the reference's indexing would wrap a negative index around and give a wrong answer).
    def project(ha, hb, pairs, weight_a, bias_a):
        return sk.skew_pair_project(ha, hb, pairs, weight_a, bias_a, backend=backend)

    compiled = torch.compile(project, fullgraph=True, dynamic=dynamic)
    args = [_good()[name] for name in ("ha", "hb", "pairs", "weight_a", "bias_a")]
    for result, expected in zip(compiled(*args), python_ref.skew_pair_project(*args)):
        torch.testing.assert_close(result, expected)
    for column, pairs in ((0, [[3, 2], [4, 0]]), (1, [[3, 2], [0, -1]])):
        with pytest.raises((ValueError, RuntimeError), match=rf"pairs\[:, {column}\] must lie in"):
            compiled(*args[:2], torch.tensor(pairs), *args[3:])


def test_opcheck_reference_pair_check():
    # The op that checks the reference's pairs in a compiled graph (test_compiled_graph_still_checks_the_pairs).
    torch.library.opcheck(torch.ops.stepfusion.skew_pair_project_checked_pairs.default, (_good()["pairs"], 4, 3))


@pytest.mark.parametrize("num_pairs", [1, 256, 257, 1000])
@pytest.mark.parametrize(("position", "column", "value"), [(0, 0, 4), (-1, 1, 3), (-1, 0, -1)])
def test_pair_range_check_finds_the_one_bad_pair(num_pairs, position, column, value):
    # Up to 256 pairs are checked as Python ints, more by tensor reductions: one bad entry, first or last,
    # must be found either way, and the same pairs without it must pass.
    pairs = torch.stack([torch.arange(num_pairs) % 4, torch.arange(num_pairs) % 3], dim=1)
    kwargs = {**_good(), "pairs": pairs}
    pa, _ = sk.skew_pair_project(**kwargs, backend="reference")
    assert pa.shape == (num_pairs, 3, 6)
    pairs = pairs.clone()
    pairs[position, column] = value
    with pytest.raises(ValueError, match=rf"pairs\[:, {column}\] must lie in .* got values in .*{value}"):
        sk.skew_pair_project(**{**kwargs, "pairs": pairs}, backend="reference")


def test_backend_selection_errors():
    check_backend_selection_errors(sk.skew_pair_project, _good)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_GPU)])
def test_auto_runs_the_reference_for_a_dtype_no_kernel_takes(device):
    check_auto_runs_the_reference(sk.skew_pair_project, _good, device)


@pytest.mark.skipif("cpu" not in sk.backends(), reason="the C++ extension was not built")
@pytest.mark.parametrize(("pairs", "match"), [
    (torch.tensor([[4, 0]]), r"pairs\[:, 0\] must lie in \[0, LA = 4\), got values in \[4, 4\]"),
    (torch.tensor([[0, -1]]), r"pairs\[:, 1\] must lie in \[0, LB = 3\), got values in \[-1, -1\]"),
    (torch.tensor([[1, 1], [0, 2], [3, 0], [4, 1]]), r"pairs\[:, 0\] .* got values in \[0, 4\]"),
    (torch.tensor([[1, 2], [0, -2], [3, 0]]), r"pairs\[:, 1\] .* got values in \[-2, 2\]"),
    (torch.tensor([[1, 7, 2], [0, 7, 3]])[:, ::2], r"pairs\[:, 1\] .* got values in \[2, 3\]"),
], ids=["past-LA", "negative", "past-LA-last-of-4", "negative-in-the-middle", "non-contiguous"])
def test_cpp_op_checks_the_pair_range_itself(pairs, match):
    good = _good()
    args = (good["ha"], good["hb"], pairs, good["weight_a"], None, None, None)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.stepfusion.skew_pair_project(*args)
    grads = (torch.zeros(pairs.shape[0], 3, 6), torch.zeros(pairs.shape[0], 3, 6))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.stepfusion.skew_pair_project_backward(*grads, *args)


@pytest.mark.skipif("cpu" not in sk.backends(), reason="the C++ extension was not built")
def test_cpp_op_checks_shapes_itself():
    good = _good()
    with pytest.raises(RuntimeError, match="weight_b"):
        torch.ops.stepfusion.skew_pair_project(good["ha"], good["hb"], good["pairs"], good["weight_a"], None,
                                               torch.randn(6, 4), None)


@pytest.mark.skipif("triton" not in sk.backends(), reason="triton is not usable here")
def test_triton_op_checks_the_pair_range_itself():
    good = _good()
    device = "cuda" if HAS_CUDA else "cpu"
    args = [t.to(device) for t in (good["ha"], good["hb"], torch.tensor([[0, 3]]), good["weight_a"])]
    with pytest.raises(RuntimeError, match=r"pairs\[:, 1\]"):
        torch.ops.stepfusion.skew_pair_project_triton(*args, None, None, None)


@NEEDS_GPU
def test_large_stacks_use_64_bit_offsets():
    # The last layer of a (3, 2^20 + 1, 1024) bf16 stack starts past element 2^31.
    layers, samples, in_features = 3, (1 << 20) + 1, 1024
    ha = torch.randn(layers, samples, in_features, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(16, in_features, device="cuda", dtype=torch.bfloat16) / 32
    pairs = torch.tensor([[2, 2]], device="cuda")
    for backend in ("cuda", "triton"):
        pa, pb = sk.skew_pair_project(ha, ha, pairs, weight, backend=backend)
        expected = ha[2, -2:].double() @ weight.double().T
        torch.testing.assert_close(pa[0, -2:].double(), expected, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(pb[0, -2:].double(), expected, rtol=2e-2, atol=2e-2)
        del pa, pb


@pytest.mark.skipif("triton" not in sk.backends(), reason="triton is not usable here")
def test_triton_gpu_tiles_fit_tl_dot_and_the_row_count():
    from stepfusion_kernels.triton import skew_pair_project as kernels
    pointer = [(kernel, tuned[dot_fp32]) for kernel, tuned in (kernels.FORWARD, kernels.GRAD_STACK,
                                                               kernels.GRAD_WEIGHT) for dot_fp32 in (True, False)]
    tma = [(kernel, tuned) for kernel, tuned, _ in (kernels.TMA_FORWARD, kernels.TMA_GRAD_STACK,
                                                    kernels.TMA_GRAD_WEIGHT)]
    for kernel, tuned in pointer + tma:
        assert tuned.fn is kernel  # the interpreter tests run the body the GPU tunes
        for config in tuned.configs:
            blocks = [size for name, size in config.kwargs.items() if name.startswith("BLOCK_")]
            assert len(blocks) == 3
            assert all(size >= kernels.MIN_DOT_BLOCK and size & (size - 1) == 0 for size in blocks)
    # A TMA config sets its tile on every descriptor before the launch: [1, rows, columns] of its blocks.
    _, tuned, set_blocks = kernels.TMA_FORWARD
    assert all(config.pre_hook is set_blocks for config in tuned.configs)
    names = ("ha_desc", "hb_desc", "weight_a_desc", "weight_b_desc", "pa_desc", "pb_desc")
    nargs = {name: kernels._descriptor(torch.zeros(2, 64, 64)) for name in names}
    set_blocks({**nargs, "BLOCK_N": 128, "BLOCK_F": 256, "BLOCK_E": 64})
    assert [nargs[name].block_shape for name in names] == [[1, 128, 64]] * 2 + [[1, 256, 64]] * 2 + [[1, 128, 256]] * 2
    prune = kernels.keep_fitting_tiles("BLOCK_N", "samples")
    configs = kernels.tile_configs(kernels.TENSOR_CORE_TILES, "BLOCK_N", "BLOCK_F", "BLOCK_E")
    # 17 rows: tiles of at most 2 * 32 rows stay; 4096 rows: every tile; 1 row: tiles of at most 32 rows.
    assert {c.kwargs["BLOCK_N"] for c in prune(configs, {"samples": 17})} == {16, 32, 64}
    assert prune(configs, {"samples": 4096}) == configs
    assert {c.kwargs["BLOCK_N"] for c in prune(configs, {"samples": 1})} == {16, 32}
    assert prune(configs, {}, samples=17) == prune(configs, {"samples": 17})  # the TMA kernels' keyword launch
    tall = kernels.tile_configs(((128, 64, 64, 4, 3), (256, 64, 64, 8, 3)), "BLOCK_N", "BLOCK_F", "BLOCK_E")
    assert [c.kwargs["BLOCK_N"] for c in prune(tall, {"samples": 1})] == [128]  # none fits: the shortest stays


@NEEDS_GPU
@pytest.mark.parametrize(("dtype", "tma"), [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["float32", "bfloat16", "bfloat16-tma"])
def test_triton_autotuned_tiles_on_a_medium_shape(dtype, tma, request):
    # Large enough for every tile the autotuner tries, with ragged edges in N, E and F (E and F multiples
    # of 8, so that the TMA kernels take them when asked).
    if tma:
        request.getfixturevalue("triton_tma")
    generator = torch.Generator(device="cuda").manual_seed(0)
    ha = torch.randn(4, 300, 200, device="cuda", generator=generator).to(dtype)
    hb = torch.randn(3, 300, 200, device="cuda", generator=generator).to(dtype)
    weight = (torch.randn(328, 200, device="cuda", generator=generator) / 16).to(dtype)
    bias = torch.randn(328, device="cuda", generator=generator).to(dtype)
    pairs = torch.tensor([[3, 0], [1, 2], [3, 1]], device="cuda")
    args = [t.detach().requires_grad_() for t in (ha, hb, weight, bias)]
    pa, pb = sk.skew_pair_project(args[0], args[1], pairs, args[2], args[3], backend="triton")
    reference = [t.detach().double().requires_grad_() for t in args]
    ra, rb = python_ref.skew_pair_project(reference[0], reference[1], pairs, reference[2], reference[3])
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(pa.double(), ra, **tolerance)
    torch.testing.assert_close(pb.double(), rb, **tolerance)
    grad_a, grad_b = torch.randn_like(pa), torch.randn_like(pb)
    torch.autograd.backward((pa, pb), (grad_a, grad_b))
    torch.autograd.backward((ra, rb), (grad_a.double(), grad_b.double()))
    scale = {"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 0.5}
    for ours, expected in zip(args, reference):
        torch.testing.assert_close(ours.grad.double(), expected.grad, **scale)
