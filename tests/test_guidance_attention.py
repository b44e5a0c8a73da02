import warnings

import pytest
import torch

import python_ref
import stepfusion_kernels as sk
from stepfusion_kernels._backend import triton_interpreted
from harness import (HAS_CUDA, KERNELS, NEEDS_GPU, Case, OpUnderTest, backend_dtype_params, backend_params,
                     check_against_reference, check_auto_runs_the_reference, check_backend_selection_errors,
                     check_deterministic_backward, check_double_backward_raises, check_empty, check_torch_func,
                     kernel_op_params, prepare_inputs, randn, relative_error, seeded_generator)

OP = OpUnderTest(fn=sk.guidance_attention, ref=python_ref.guidance_attention, float32_tolerance=1e-4)


def make_case(batch, heads, len_q, len_k, head_dim, globals_, window, scale=None, noncontiguous=(),
              q_layout="bhld"):
    """q_layout="blhd": q is the transpose(1, 2) view of a (B, Lq, H, Dh) tensor, as a module's
    projection produces it."""

    def build(generator):
        if q_layout == "blhd":
            q = randn(generator, batch, len_q, heads, head_dim).transpose(1, 2)
        else:
            q = randn(generator, batch, heads, len_q, head_dim)
        kwargs = {"q": q, "k": randn(generator, batch, heads, len_k, head_dim),
                  "v": randn(generator, batch, heads, len_k, head_dim), "k_global": None, "v_global": None}
        if globals_ > 0:
            kwargs["k_global"] = randn(generator, batch, heads, globals_, head_dim)
            kwargs["v_global"] = randn(generator, batch, heads, globals_, head_dim)
        kwargs["window"] = window
        kwargs["scale"] = scale
        return kwargs

    name = f"B{batch}-H{heads}-Lq{len_q}-Lk{len_k}-Dh{head_dim}-G{globals_}-w{window}"
    if scale is not None:
        name += f"-scale{scale}"
    if noncontiguous:
        name += "-strided"
    if q_layout == "blhd":
        name += "-q_blhd"
    return Case(name, build, tuple(noncontiguous))


# The Triton tiles are 16 x 16 under the interpreter and the CPU blocks 32 queries x 64 keys, so the
# longer cases span several blocks and exercise the band's block skipping in both directions.
CASES = [
    make_case(2, 2, 17, 17, 16, 0, -1),
    make_case(2, 2, 17, 17, 16, 1, 0),
    make_case(1, 2, 70, 150, 16, 7, 3),         # Lq < Lk: the centres stride over the keys
    make_case(1, 2, 150, 70, 32, 7, 1),         # Lq > Lk: several queries share a centre
    make_case(2, 1, 33, 129, 16, 0, 0),
    make_case(1, 1, 129, 33, 16, 1, 2),
    make_case(1, 2, 40, 25, 16, 7, 100),        # window larger than Lk: the dense attention
    make_case(2, 2, 9, 1, 16, 0, 0),            # Lk = 1: every query sees the single key
    make_case(1, 2, 9, 1, 16, 7, -1),
    make_case(1, 2, 12, 0, 16, 7, 2),           # Lk = 0: the global tokens alone
    make_case(1, 1, 65, 97, 64, 7, 5, scale=0.3),
    make_case(2, 2, 37, 51, 16, 1, 4, q_layout="blhd", noncontiguous=("k", "v_global")),
    make_case(1, 2, 21, 21, 128, 1, -1, q_layout="blhd"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_params())
def test_matches_reference(case, backend, device, dtype):
    check_against_reference(OP, case, backend, device, dtype)


HOST_BACKENDS = [b for b in ("reference", "cpu") if b in sk.backends()]


@pytest.mark.parametrize("case", [make_case(2, 2, 19, 23, 5, 1, 2), make_case(1, 1, 40, 70, 33, 7, -1),
                                  make_case(1, 1, 3, 4, 1, 0, 0)], ids=str)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_head_dim_on_the_cpu_backend(case, backend, dtype):
    check_against_reference(OP, case, backend, "cpu", dtype)


def test_blhd_case_passes_a_noncontiguous_q():
    case = make_case(2, 2, 37, 51, 16, 1, 4, q_layout="blhd")
    test_kwargs, _ = prepare_inputs(case, seeded_generator("layout"), torch.float32, "cpu")
    assert not test_kwargs["q"].is_contiguous()


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_window_beyond_the_keys_is_the_dense_attention(backend, device):
    generator = seeded_generator("dense", backend)
    q, k, v = (randn(generator, 1, 2, n, 16).float().to(device) for n in (23, 31, 31))
    banded = sk.guidance_attention(q, k, v, window=31, backend=backend)
    dense = sk.guidance_attention(q, k, v, window=-1, backend=backend)
    torch.testing.assert_close(banded, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 2, 5, 7, 3), (2, 0, 5, 7, 3), (2, 2, 0, 7, 3), (2, 2, 0, 0, 0)], ids=str)
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_empty_inputs_give_empty_outputs(shape, backend, device):
    batch, heads, len_q, len_k, globals_ = shape
    kwargs = {"q": torch.randn(batch, heads, len_q, 16), "k": torch.randn(batch, heads, len_k, 16),
              "v": torch.randn(batch, heads, len_k, 16), "k_global": torch.randn(batch, heads, globals_, 16),
              "v_global": torch.randn(batch, heads, globals_, 16), "window": 1}
    check_empty(OP, kwargs, backend, device)


@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
def test_backward_is_bitwise_reproducible(backend, device):
    check_deterministic_backward(OP, make_case(2, 2, 70, 90, 16, 7, 3), backend, device, torch.float32)


@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
def test_double_backward_raises(backend, device):
    check_double_backward_raises(OP, make_case(1, 2, 5, 6, 16, 2, 2), backend, device)


@pytest.mark.parametrize("case", [make_case(1, 2, 9, 6, 16, 2, 2, q_layout="blhd", noncontiguous=("k",)),
                                  make_case(2, 1, 7, 7, 16, 0, -1)], ids=str)
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_torch_func_transforms(case, backend, device):
    check_torch_func(OP, case, backend, device)


@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
def test_vmap_folds_into_the_batch(backend, device):
    """vmap over inputs vmapped at different dims, one shared, with a vmapped cotangent: each index gets its
    own attention and gradients, and the kernels run once per call through the ops' batching rule (no
    per-index fallback, which warns)."""
    generator = seeded_generator("vmap fold", backend)
    vmapped, batch, heads, len_q, len_k, globals_, head_dim = 3, 2, 2, 9, 7, 2, 16
    q = randn(generator, batch, vmapped, heads, len_q, head_dim)          # vmapped at dim 1
    k = randn(generator, batch, heads, len_k, head_dim)                   # shared
    v = randn(generator, vmapped, batch, heads, len_k, head_dim)          # vmapped at dim 0
    k_global = randn(generator, batch, heads, globals_, head_dim, vmapped)  # vmapped at the last dim
    v_global = randn(generator, batch, heads, globals_, head_dim)
    cotangent = randn(generator, vmapped, batch, heads, len_q, head_dim)
    inputs = [t.float().to(device) for t in (q, k, v, k_global, v_global, cotangent)]

    def outputs_and_grads(q, k, v, k_global, v_global, cotangent):
        def attend(q, k, v, k_global, v_global):
            return sk.guidance_attention(q, k, v, k_global, v_global, window=2, backend=backend)

        out, pullback = torch.func.vjp(attend, q, k, v, k_global, v_global)
        return out, pullback(cotangent)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads = torch.func.vmap(outputs_and_grads, in_dims=(1, None, 0, -1, None, 0))(*inputs)
    assert not [w for w in caught if "batching rule" in str(w.message)]
    for index in range(vmapped):
        leaves = [t.clone().requires_grad_() for t in (q[:, index], k, v[index], k_global[..., index], v_global)]
        expected = python_ref.guidance_attention(*leaves, window=2)
        expected_grads = torch.autograd.grad(expected, leaves, cotangent[index])
        assert relative_error(out[index], expected) <= OP.float32_tolerance
        for name, grad, expected_grad in zip(("q", "k", "v", "k_global", "v_global"), grads, expected_grads):
            error = relative_error(grad[index], expected_grad)
            assert error <= OP.float32_tolerance, f"grad of {name}: relative error {error:.3g}"


def _op_samples(dtype, device="cpu"):
    generator = seeded_generator("opcheck")

    def t(*shape):
        return randn(generator, *shape).to(device=device, dtype=dtype).requires_grad_()

    banded = (t(2, 2, 19, 16), t(2, 2, 23, 16), t(2, 2, 23, 16), t(2, 2, 3, 16), t(2, 2, 3, 16), 2, 0.25)
    dense = (t(1, 2, 9, 16), t(1, 2, 5, 16), t(1, 2, 5, 16), None, None, -1, 0.25)
    global_only = (t(1, 1, 6, 16), t(1, 1, 0, 16), t(1, 1, 0, 16), t(1, 1, 2, 16), t(1, 1, 2, 16), 0, 0.5)
    return [banded, dense, global_only]


@pytest.mark.parametrize(("op", "device", "dtype"), kernel_op_params("guidance_attention"))
def test_opcheck(op, device, dtype):
    for args in _op_samples(dtype, device):
        torch.library.opcheck(op, args)


@pytest.mark.skipif("cpu" not in sk.backends(), reason="the C++ extension was not built")
def test_gradcheck_cpu_float64():
    generator = seeded_generator("gradcheck")
    args = [randn(generator, *shape).requires_grad_()
            for shape in ((1, 2, 7, 3), (1, 2, 11, 3), (1, 2, 11, 3), (1, 2, 2, 3), (1, 2, 2, 3))]
    assert torch.autograd.gradcheck(lambda *a: sk.guidance_attention(*a, window=2, backend="cpu"), args)


@pytest.mark.skipif("cpu" not in sk.backends(), reason="the C++ extension was not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("len_q", "len_k", "head_dim"), [(50, 48, 128), (17, 33, 17)])
def test_cpu_rows_with_one_key_give_exactly_zero_q_and_k_gradients(dtype, len_q, len_k, head_dim):
    """window 0 without global tokens: every query sees one key, o is v at its centre, and the gradients of q
    and k are exactly 0. The cpu backend sums delta = dO . o in the order of its dO . v products, so
    dO . v - delta cancels exactly."""
    generator = seeded_generator(f"one key {dtype} {len_q} {len_k} {head_dim}")
    q, k, v = (randn(generator, 1, 2, length, head_dim).to(dtype).requires_grad_()
               for length in (len_q, len_k, len_k))
    out = sk.guidance_attention(q, k, v, window=0, scale=0.3, backend="cpu")
    out.backward(randn(generator, *out.shape).to(dtype))
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))
    assert v.grad.abs().sum() > 0


@pytest.mark.skipif("cpu" not in sk.backends(), reason="the C++ extension was not built")
@pytest.mark.parametrize("case", [make_case(1, 2, 70, 150, 16, 7, 3), make_case(1, 2, 150, 70, 17, 0, 1),
                                  make_case(1, 2, 97, 97, 33, 3, -1)], ids=str)
def test_cpu_backward_bits_do_not_depend_on_thread_count(case):
    """B x H = 2: one thread runs the fused one-pass backward (two (batch, head) tasks per thread or more),
    two and three threads the query pass then the key pass. Both add every term in the same order."""
    kwargs, _ = prepare_inputs(case, seeded_generator(case.name, "threads"), torch.float32, "cpu")
    inputs = [value for value in kwargs.values() if isinstance(value, torch.Tensor)]
    out = sk.guidance_attention(**kwargs, backend="cpu")
    upstream = randn(seeded_generator(case.name, "threads upstream"), *out.shape).float()
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(torch.autograd.grad(sk.guidance_attention(**kwargs, backend="cpu"), inputs, upstream))
    finally:
        torch.set_num_threads(threads)
    for grads in results[1:]:
        assert all(torch.equal(first, other) for first, other in zip(results[0], grads))


@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
def test_torch_compile_fullgraph(backend, device):
    generator = seeded_generator("compile", backend)
    args = [randn(generator, *shape).float().to(device).requires_grad_()
            for shape in ((2, 2, 9, 16), (2, 2, 13, 16), (2, 2, 13, 16), (2, 2, 3, 16), (2, 2, 3, 16))]

    def attend(q, k, v, k_global, v_global):
        return sk.guidance_attention(q, k, v, k_global, v_global, window=2, backend=backend)

    compiled = torch.compile(attend, fullgraph=True)
    expected = attend(*args)
    result = compiled(*args)
    torch.testing.assert_close(result, expected)
    grads = torch.autograd.grad(result.square().sum(), args)
    expected_grads = torch.autograd.grad(expected.square().sum(), args)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("global_tokens", [0, 3])
def test_module_matches_reference_and_trains(global_tokens):
    torch.manual_seed(0)
    module = sk.nn.GuidanceAttention(32, heads=2, window=2, global_tokens=global_tokens, dim_kv=24)
    generator = seeded_generator("module", global_tokens)
    x, guide = randn(generator, 2, 11, 32).float(), randn(generator, 2, 17, 24).float()
    y = module(x, guide)
    assert y.shape == (2, 11, 32)

    # The same module written out with the reference op and explicit segment means.
    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], 2, 16).transpose(1, 2)

    k, v = module.k_proj(guide), module.v_proj(guide)
    k_global = v_global = None
    if global_tokens:
        segments = [(g * 17 // global_tokens, -(-(g + 1) * 17 // global_tokens)) for g in range(global_tokens)]
        k_global = heads(torch.stack([k[:, a:b].mean(1) for a, b in segments], 1))
        v_global = heads(torch.stack([v[:, a:b].mean(1) for a, b in segments], 1))
    attended = python_ref.guidance_attention(heads(module.q_proj(x)), heads(k), heads(v), k_global, v_global,
                                             window=2)
    expected = module.out_proj(attended.transpose(1, 2).reshape(2, 11, 32))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    for parameter in module.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert "heads=2" in repr(module)


def test_module_rejects_bad_heads():
    with pytest.raises(ValueError, match="heads"):
        sk.nn.GuidanceAttention(30, heads=4)


# Bad inputs: every message must name the argument at fault.
def _good(dtype=torch.float32):
    return {"q": torch.randn(2, 2, 5, 16, dtype=dtype), "k": torch.randn(2, 2, 7, 16, dtype=dtype),
            "v": torch.randn(2, 2, 7, 16, dtype=dtype), "k_global": torch.randn(2, 2, 3, 16, dtype=dtype),
            "v_global": torch.randn(2, 2, 3, 16, dtype=dtype), "window": 1}


BAD_INPUTS = [
    ("q rank", {"q": torch.randn(2, 5, 16)}, ValueError, "q"),
    ("window below -1", {"window": -2}, ValueError, "window"),
    ("window not an int", {"window": 1.5}, ValueError, "window"),
    ("k heads", {"k": torch.randn(2, 3, 7, 16)}, ValueError, "k"),
    ("k head dim", {"k": torch.randn(2, 2, 7, 8)}, ValueError, "k"),
    ("v batch", {"v": torch.randn(1, 2, 7, 16)}, ValueError, "v"),
    ("v length differs from k", {"v": torch.randn(2, 2, 6, 16)}, ValueError, "v"),
    ("k_global without v_global", {"v_global": None}, ValueError, "v_global"),
    ("v_global without k_global", {"k_global": None}, ValueError, "k_global"),
    ("v_global tokens differ", {"v_global": torch.randn(2, 2, 4, 16)}, ValueError, "v_global"),
    ("k_global head dim", {"k_global": torch.randn(2, 2, 3, 8)}, ValueError, "k_global"),
    ("Lk = 0 without globals", {"k": torch.randn(2, 2, 0, 16), "v": torch.randn(2, 2, 0, 16), "k_global": None,
                                "v_global": None}, ValueError, "Lk = 0"),
    ("dtype mix", {"v": torch.randn(2, 2, 7, 16, dtype=torch.float64)}, ValueError, "v"),
    ("integer q", {"q": torch.ones(2, 2, 5, 16, dtype=torch.int64)}, ValueError, "q"),
    ("device mix", {"k_global": torch.randn(2, 2, 3, 16, device="meta")}, RuntimeError, "k_global"),
    ("scale not a number", {"scale": "big"}, ValueError, "scale"),
    ("scale NaN", {"scale": float("nan")}, ValueError, "scale must be a finite"),
    ("scale infinite", {"scale": float("inf")}, ValueError, "scale must be a finite"),
]


@pytest.mark.parametrize(("change", "error", "name"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(change, error, name):
    kwargs = {**_good(), **change}
    with pytest.raises(error, match=name):
        sk.guidance_attention(**kwargs, backend="auto")


def test_backend_selection_errors():
    check_backend_selection_errors(sk.guidance_attention, _good)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_GPU)])
def test_auto_runs_the_reference_for_a_dtype_no_kernel_takes(device):
    check_auto_runs_the_reference(sk.guidance_attention, _good, device)


@NEEDS_GPU
def test_auto_runs_the_reference_for_a_head_dim_the_gpu_kernels_lack():
    def head_dim_48(dtype):
        return {name: value[..., :12].repeat_interleave(4, dim=-1) if isinstance(value, torch.Tensor) else value
                for name, value in _good(dtype).items()}

    check_auto_runs_the_reference(sk.guidance_attention, head_dim_48, "cuda", dtype=torch.float32)


@pytest.mark.skipif("triton" not in sk.backends(), reason="triton is not usable here")
def test_triton_rejects_unsupported_head_dims():
    device = "cuda" if HAS_CUDA else "cpu"  # Triton takes CPU tensors only through its interpreter
    kwargs = {name: (t[..., :12].to(device) if isinstance(t, torch.Tensor) else t) for name, t in _good().items()}
    with pytest.raises(ValueError, match="head dim"):
        sk.guidance_attention(**kwargs, backend="triton")


def _gpu_tiles():
    from stepfusion_kernels.triton import guidance_attention as kernels
    return sorted({*kernels.FP32_BLOCKS.values(), *kernels.SM8X_BLOCKS.values(), (64, 64)})


@pytest.mark.skipif(not triton_interpreted() or "triton" not in sk.backends(),
                    reason="on a GPU the other tests run the GPU tiles themselves")
@pytest.mark.parametrize("blocks", _gpu_tiles() if "triton" in sk.backends() else [], ids=str)
@pytest.mark.parametrize("case", [make_case(1, 2, 70, 150, 16, 7, 3), make_case(1, 2, 150, 70, 32, 7, 1),
                                  make_case(1, 1, 129, 33, 16, 1, -1)], ids=str)
def test_triton_gpu_tiles_in_the_interpreter(blocks, case, monkeypatch):
    # The interpreter's own tiles are 16 x 16; the band's block arithmetic must hold for the GPU's as well.
    from stepfusion_kernels.triton import guidance_attention as kernels
    monkeypatch.setattr(kernels, "_blocks", lambda dtype, head_dim, device: (*blocks, 1, 1))
    check_against_reference(OP, case, "triton", "cpu", torch.float32)


@pytest.mark.skipif("cpu" not in sk.backends(), reason="the C++ extension was not built")
@pytest.mark.parametrize(("args", "name"), [
    ((torch.randn(2, 2, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 6, 16), None, None, 1, 0.25), "v"),
    ((torch.randn(2, 2, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 3, 16), None,
      1, 0.25), "v_global"),
    ((torch.randn(2, 2, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16), None, None, -3, 0.25), "window"),
    ((torch.randn(2, 2, 5, 16), torch.randn(2, 2, 0, 16), torch.randn(2, 2, 0, 16), None, None, 1, 0.25), "Lk"),
], ids=["v length", "v_global missing", "window", "no keys"])
def test_cpp_op_checks_arguments_itself(args, name):
    with pytest.raises(RuntimeError, match=name):
        torch.ops.stepfusion.guidance_attention(*args)


@NEEDS_GPU
def test_large_inputs_use_64_bit_offsets():
    # Element offsets past 2^31 are reached at the last rows of a (1, 1, L, 128) tensor with L > 2^24.
    length, window = (1 << 24) + 33, 2
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 1, length, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
               for _ in range(3))
    tail = 16
    for backend in [b for b in ("cuda", "triton") if b in sk.backends()]:
        out = sk.guidance_attention(q, k, v, window=window, backend=backend)
        # Lq == Lk, so the last `tail` queries and keys keep their alignment; the first `window` rows of
        # the slice miss keys before it and are not compared.
        expected = python_ref.guidance_attention(q[:, :, -tail:].double(), k[:, :, -tail:].double(),
                                                 v[:, :, -tail:].double(), window=window)
        torch.testing.assert_close(out[:, :, -tail + window:].double(), expected[:, :, window:], rtol=2e-2,
                                   atol=2e-2)
        del out
