import pytest
import torch

import python_ref
import stepfusion_kernels as sk
from harness import (KERNELS, NEEDS_GPU, Case, OpUnderTest, backend_dtype_params, backend_params,
                     check_against_reference, check_auto_runs_the_reference, check_backend_selection_errors,
                     check_deterministic_backward, check_double_backward_raises, check_empty, check_torch_func,
                     kernel_op_params, randn, seeded_generator)

OP = OpUnderTest(fn=sk.shift_expand, ref=python_ref.shift_expand)
ALL_OPTIONAL = ("scale_local", "shift_local", "scale_global", "shift_global", "gate", "weight", "bias")


def make_case(batch, length, dim, present=ALL_OPTIONAL, noncontiguous=(), eps=1e-5):
    def build(generator):
        shapes = {"scale_local": (batch, length, dim), "shift_local": (batch, length, dim),
                  "scale_global": (batch, dim), "shift_global": (batch, dim),
                  "gate": (dim,), "weight": (dim,), "bias": (dim,)}
        kwargs = {"x": randn(generator, batch, length, dim) * 2 + 0.5}
        for name in ALL_OPTIONAL:
            kwargs[name] = randn(generator, *shapes[name]) if name in present else None
        kwargs["eps"] = eps
        return kwargs

    name = f"B{batch}-L{length}-D{dim}-" + ("+".join(present) if present != ALL_OPTIONAL else "all")
    if noncontiguous:
        name += "-strided"
    return Case(name, build, tuple(noncontiguous))


CASES = [
    make_case(2, 17, 33),
    make_case(1, 1, 1),
    make_case(3, 5, 1),  # D = 1: the LayerNorm output is the bias alone
    make_case(2, 9, 257),
    make_case(1, 33, 64, present=()),
    make_case(2, 17, 33, present=("scale_local", "shift_local")),
    make_case(2, 17, 33, present=("scale_global", "shift_global")),
    make_case(2, 17, 33, present=("scale_local", "shift_global", "weight")),
    make_case(3, 6, 16, present=("gate", "weight", "bias"), eps=1e-3),
    make_case(2, 17, 33, noncontiguous=("x", "scale_local", "shift_local", "scale_global", "gate", "weight")),
    make_case(1, 65, 130),  # more rows than one backward tile of the CPU and Triton kernels
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_params())
def test_matches_reference(case, backend, device, dtype):
    check_against_reference(OP, case, backend, device, dtype)


@pytest.mark.parametrize("shape", [(0, 4, 8), (2, 0, 8), (2, 3, 0)], ids=str)
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_empty_inputs_give_empty_outputs(shape, backend, device):
    batch, length, dim = shape
    kwargs = {"x": torch.randn(shape), "scale_local": torch.randn(shape), "scale_global": torch.randn(batch, dim),
              "gate": torch.randn(dim), "weight": torch.randn(dim)}
    check_empty(OP, kwargs, backend, device)


@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
def test_backward_is_bitwise_reproducible(backend, device):
    check_deterministic_backward(OP, make_case(3, 70, 40), backend, device, torch.float32)


@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
def test_double_backward_raises(backend, device):
    check_double_backward_raises(OP, make_case(2, 5, 8), backend, device)


@pytest.mark.parametrize("case", [make_case(2, 5, 8, noncontiguous=("x", "scale_global")),
                                  make_case(3, 4, 16, present=("shift_local",))], ids=str)
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_torch_func_transforms(case, backend, device):
    check_torch_func(OP, case, backend, device)


def _op_samples(dtype, device="cpu"):
    generator = seeded_generator("opcheck")

    def t(*shape):
        return randn(generator, *shape).to(device=device, dtype=dtype).requires_grad_()

    full = (t(2, 5, 7), t(2, 5, 7), t(2, 5, 7), t(2, 7), t(2, 7), t(7), t(7), t(7), 1e-5)
    bare = (t(3, 4, 9), None, None, None, None, None, None, None, 1e-5)
    mixed = (t(1, 6, 3), t(1, 6, 3), None, None, t(1, 3), t(3), None, t(3), 1e-2)
    return [full, bare, mixed]


@pytest.mark.parametrize(("op", "device", "dtype"), kernel_op_params("shift_expand"))
def test_opcheck(op, device, dtype):
    for args in _op_samples(dtype, device):
        torch.library.opcheck(op, args)


def test_gradcheck_cpu_float64():
    generator = seeded_generator("gradcheck")
    args = [randn(generator, *shape).requires_grad_()
            for shape in ((2, 3, 5), (2, 3, 5), (2, 3, 5), (2, 5), (2, 5), (5,), (5,), (5,))]
    assert torch.autograd.gradcheck(lambda *a: sk.shift_expand(*a, backend="cpu"), args)


@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
def test_torch_compile_fullgraph(backend, device):
    generator = seeded_generator("compile", backend)
    args = [randn(generator, *shape).float().to(device).requires_grad_()
            for shape in ((2, 5, 8), (2, 5, 8), (2, 8), (8,))]

    def step(x, scale_local, shift_global, weight):
        return sk.shift_expand(x, scale_local=scale_local, shift_global=shift_global, weight=weight, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    expected = step(*args)
    result = compiled(*args)
    torch.testing.assert_close(result, expected)
    grads = torch.autograd.grad(result.square().sum(), args)
    expected_grads = torch.autograd.grad(expected.square().sum(), args)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_module_matches_functional_and_trains():
    module = sk.nn.StepShiftExpand(12, gate_init=0.1)
    generator = seeded_generator("module")
    x, scale_local, shift_global = randn(generator, 2, 5, 12).float(), randn(generator, 2, 5, 12).float(), None
    y = module(x, scale_local=scale_local, shift_global=shift_global)
    expected = python_ref.shift_expand(x, scale_local=scale_local, gate=module.gate, weight=module.weight,
                                       bias=module.bias)
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (module.gate, module.weight))
    assert "12" in repr(module)


# Bad inputs: every message must name the argument at fault.
def _good(batch=2, length=3, dim=4, dtype=torch.float32):
    return {"x": torch.randn(batch, length, dim, dtype=dtype), "scale_local": torch.randn(batch, length, dim, dtype=dtype),
            "shift_global": torch.randn(batch, dim, dtype=dtype), "gate": torch.randn(dim, dtype=dtype)}


BAD_INPUTS = [
    ("x rank", {"x": torch.randn(3, 4)}, ValueError, "x"),
    ("scale_local batch", {"scale_local": torch.randn(1, 3, 4)}, ValueError, "scale_local"),
    ("scale_local length", {"scale_local": torch.randn(2, 5, 4)}, ValueError, "scale_local"),
    ("shift_global dim", {"shift_global": torch.randn(2, 5)}, ValueError, "shift_global"),
    ("shift_global rank", {"shift_global": torch.randn(2, 1, 4)}, ValueError, "shift_global"),
    ("gate shape", {"gate": torch.randn(5)}, ValueError, "gate"),
    ("weight shape", {"weight": torch.randn(4, 1)}, ValueError, "weight"),
    ("dtype mix", {"scale_local": torch.randn(2, 3, 4, dtype=torch.float64)}, ValueError, "scale_local"),
    ("integer x", {"x": torch.ones(2, 3, 4, dtype=torch.int64)}, ValueError, "x"),
    ("device mix", {"gate": torch.randn(4, device="meta")}, RuntimeError, "gate"),
    ("negative eps", {"eps": -1.0}, ValueError, "eps"),
    ("not a tensor", {"bias": [0.0] * 4}, ValueError, "bias"),
]


@pytest.mark.parametrize(("change", "error", "name"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(change, error, name):
    kwargs = {**_good(), **change}
    with pytest.raises(error, match=name):
        sk.shift_expand(**kwargs, backend="auto")


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_bad_shape_names_the_argument(dynamic):
    # While torch.compile traces, the sizes are SymInts when dynamic, which Dynamo cannot format with str():
    # the message must still be made. Under fullgraph Dynamo wraps the ValueError in an exception of its own.
    compiled = torch.compile(lambda **kwargs: sk.shift_expand(**kwargs, backend="reference"), fullgraph=True,
                             dynamic=dynamic)
    compiled(**_good())
    with pytest.raises(Exception, match=r"scale_local must have shape \(2, 3, 4\), got \(2, 5, 4\)"):
        compiled(**{**_good(), "scale_local": torch.randn(2, 5, 4)})


def test_backend_selection_errors():
    check_backend_selection_errors(sk.shift_expand, _good)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_GPU)])
def test_auto_runs_the_reference_for_a_dtype_no_kernel_takes(device):
    check_auto_runs_the_reference(sk.shift_expand, _good, device)


@pytest.mark.skipif("cpu" not in sk.backends(), reason="the C++ extension was not built")
def test_cpp_op_checks_shapes_itself():
    with pytest.raises(RuntimeError, match="gate"):
        torch.ops.stepfusion.shift_expand(torch.randn(2, 3, 4), None, None, None, None, torch.randn(5), None, None,
                                          1e-5)


@NEEDS_GPU
def test_large_rows_use_64_bit_offsets():
    # More than 2^31 elements would need 8+ GiB per tensor; a row offset past 2^31 is reached with
    # B * L * D > 2^31 at the last rows, so check the last row of such a tensor (bf16, 4 GiB).
    batch, length, dim = 1, (1 << 21) + 1, 1024
    x = torch.randn(batch, length, dim, device="cuda", dtype=torch.bfloat16)
    for backend in ("cuda", "triton"):
        y = sk.shift_expand(x, backend=backend)
        expected = python_ref.shift_expand(x[:, -2:].double())
        torch.testing.assert_close(y[:, -2:].double(), expected, rtol=2e-2, atol=2e-2)
        del y


# Chunks of 16 (the chunked_rows fixture): D = 33 ends in a partial chunk, D = 64 in a whole one. The
# interpreter is slow per chunk: CASES up to D = 64, a narrower case with several backward tiles, and one
# case for the 16-bit dtypes.
CHUNKED_CASES = [case for case in CASES if case.name not in ("B2-L9-D257-all", "B1-L65-D130-all")]
CHUNKED_CASES.append(make_case(1, 65, 20))


@pytest.mark.parametrize(("case", "backend", "device", "dtype"), [
    pytest.param(case, *param.values, id=f"{case}-{param.id}", marks=param.marks)
    for param in backend_dtype_params(only=("triton",))
    for case in CHUNKED_CASES if param.values[2] == torch.float32 or case.name == "B2-L17-D33-all"])
def test_triton_chunked_rows_match_reference(case, backend, device, dtype, chunked_rows):
    check_against_reference(OP, case, backend, device, dtype)


@pytest.mark.parametrize(("backend", "device"), backend_params(only=("triton",)))
def test_triton_rows_wider_than_one_block(backend, device):
    # Past FUSED_MAX (8192) a row is no longer held whole; before the chunked kernels, rows past 65536 were
    # refused. 70001 channels: 69 chunks of 1024, the last one partial.
    check_against_reference(OP, make_case(1, 3, 70001), backend, device, torch.float32)
