"""One test harness for every op: each usable backend against python_ref evaluated in float64.

An op's test file describes the op once (`OpUnderTest`) and lists its cases (`Case`); the harness
turns them into tests over backends x dtypes, forward and every gradient, and provides the shared
checks (opcheck, gradcheck, torch.compile, empty inputs, determinism)."""

import dataclasses
import zlib
from typing import Callable

import pytest
import torch

import stepfusion_kernels
from stepfusion_kernels._backend import triton_interpreted

# ||out - ref|| / ||ref|| bounds of SPEC.md, per dtype; an op may loosen float32 (guidance_attention).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = {
    "reference": (torch.float32, torch.bfloat16),  # the fp64 reference would only compare with itself
    "cpu": (torch.float64, torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
KERNELS = ("cpu", "cuda", "triton")  # every backend but the reference
HAS_CUDA = torch.cuda.is_available()
NEEDS_GPU = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)")


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration. `build(generator)` returns the op's keyword arguments with float64 CPU
    tensors (or None / plain values); `noncontiguous` names the tensors to pass as strided views."""

    name: str
    build: Callable[[torch.Generator], dict]
    noncontiguous: tuple = ()

    def __str__(self):
        return self.name


@dataclasses.dataclass(frozen=True)
class OpUnderTest:
    """fn(**kwargs, backend=...) is the public op and ref(**kwargs) its python_ref."""

    fn: Callable
    ref: Callable
    float32_tolerance: float = TOLERANCE[torch.float32]

    def tolerance(self, dtype):
        return self.float32_tolerance if dtype == torch.float32 else TOLERANCE[dtype]


def host_backends(*names):
    """The backends among `names` that take CPU tensors here. Triton does only through its interpreter, which
    runs where there is no GPU; on a GPU machine its tests take CUDA tensors."""
    usable = stepfusion_kernels.backends()
    return [name for name in names
            if name in usable and name != "cuda" and (name != "triton" or triton_interpreted())]


def backend_params(only=None):
    """(backend, device) pairs: the CPU ones, and the GPU ones (skipped without a GPU); only the backends
    named in `only` when it is given."""
    params = [pytest.param(name, "cpu", id=f"{name}-cpu") for name in host_backends("reference", "cpu", "triton")]
    params += [pytest.param(name, "cuda", id=f"{name}-cuda", marks=NEEDS_GPU) for name in ("cuda", "triton")]
    return [param for param in params if only is None or param.values[0] in only]


def kernel_op_params(op):
    """(registered op, device, dtype) for opcheck: the C++ op (float64 on the CPU, float32 on a GPU) and the
    Triton op (float32: on the GPU, or on CPU tensors through the interpreter)."""
    usable = stepfusion_kernels.backends()
    params = []
    if "cpu" in usable:
        cpp = getattr(torch.ops.stepfusion, op).default
        params.append(pytest.param(cpp, "cpu", torch.float64, id="cpp-cpu"))
        params.append(pytest.param(cpp, "cuda", torch.float32, id="cpp-cuda", marks=NEEDS_GPU))
    if "triton" in usable or not HAS_CUDA:
        device = "cuda" if HAS_CUDA else "cpu"
        params.append(pytest.param(getattr(torch.ops.stepfusion, f"{op}_triton").default, device, torch.float32,
                                   id=f"triton-{device}"))
    return params


def backend_dtype_params(only=None):
    """(backend, device, dtype) triples over backend_params(only)."""
    params = []
    for param in backend_params(only):
        backend, device = param.values
        for dtype in DTYPES[backend]:
            short = str(dtype).replace("torch.", "")
            params.append(pytest.param(backend, device, dtype, id=f"{param.id}-{short}", marks=param.marks))
    return params


def seeded_generator(*names):
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, names)).encode()))


def randn(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def strided_view(tensor):
    """The same values as a non-contiguous view (every other element of a wider buffer)."""
    wide = tensor.new_zeros(*tensor.shape, 2)
    wide[..., 0] = tensor
    return wide[..., 0]


def poison_cuda_cache():
    """Fills freed CUDA memory with NaN so that an output element a kernel forgets to write shows up."""
    if HAS_CUDA:
        torch.empty(64 << 20, device="cuda").fill_(float("nan"))
        torch.cuda.synchronize()


def relative_error(out, ref):
    out = out.detach().to(device="cpu", dtype=torch.float64)
    ref = ref.detach().to(torch.float64)
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite values in the output"
    scale = ref.norm().item()
    error = (out - ref).norm().item()
    return error / scale if scale > 0 else error


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def prepare_inputs(case, generator, dtype, device):
    """(kwargs for the backend, kwargs for the fp64 reference): the same values, the backend's rounded
    to `dtype` first so that only the op's own error is measured."""
    test_kwargs, ref_kwargs = {}, {}
    for name, value in case.build(generator).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            rounded = value.to(dtype)
            ref_kwargs[name] = rounded.to(torch.float64).requires_grad_()
            test_value = rounded.to(device)
            if name in case.noncontiguous:
                test_value = strided_view(test_value)
            test_kwargs[name] = test_value.requires_grad_()
        else:
            test_kwargs[name] = value.to(device) if isinstance(value, torch.Tensor) else value
            ref_kwargs[name] = value
    return test_kwargs, ref_kwargs


def check_against_reference(op, case, backend, device, dtype):
    """Forward outputs and the gradients of every float input against the fp64 reference."""
    generator = seeded_generator(case.name, backend, device, dtype)
    test_kwargs, ref_kwargs = prepare_inputs(case, generator, dtype, device)
    poison_cuda_cache()
    outputs = as_tuple(op.fn(**test_kwargs, backend=backend))
    references = as_tuple(op.ref(**ref_kwargs))
    tolerance = op.tolerance(dtype)
    for index, (out, ref) in enumerate(zip(outputs, references, strict=True)):
        assert out.dtype == dtype and out.device.type == device, f"output {index}: {out.dtype} on {out.device}"
        error = relative_error(out, ref)
        assert error <= tolerance, f"output {index}: relative error {error:.3g} > {tolerance:g}"

    grad_names = [name for name, value in test_kwargs.items()
                  if isinstance(value, torch.Tensor) and value.requires_grad]
    upstream = [randn(generator, *ref.shape).to(out.dtype) for out, ref in zip(outputs, references)]
    test_grads = torch.autograd.grad([o for o in outputs], [test_kwargs[n] for n in grad_names],
                                     [g.to(device) for g in upstream], allow_unused=True)
    ref_grads = torch.autograd.grad(list(references), [ref_kwargs[n] for n in grad_names],
                                    [g.to(torch.float64) for g in upstream], allow_unused=True)
    for name, grad, ref_grad in zip(grad_names, test_grads, ref_grads):
        if ref_grad is None:
            assert grad is None or not grad.any(), f"grad of {name}: reference has none"
            continue
        assert grad is not None, f"grad of {name} is missing"
        assert grad.dtype == dtype, f"grad of {name} has dtype {grad.dtype}"
        error = relative_error(grad, ref_grad)
        assert error <= tolerance, f"grad of {name}: relative error {error:.3g} > {tolerance:g}"


def check_empty(op, kwargs, backend, device):
    """Empty inputs give empty outputs of the right shape, forward and backward."""
    kwargs = {k: (v.to(device).requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v)
              for k, v in kwargs.items()}
    outputs = as_tuple(op.fn(**kwargs, backend=backend))
    references = as_tuple(op.ref(**{k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                                    for k, v in kwargs.items()}))
    for out, ref in zip(outputs, references, strict=True):
        assert out.shape == ref.shape and out.numel() == 0
    sources = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad([o.sum() for o in outputs], sources, allow_unused=True)
    for source, grad in zip(sources, grads):
        assert grad is None or grad.shape == source.shape


def check_deterministic_backward(op, case, backend, device, dtype):
    """The same inputs give bitwise-identical gradients on repeated runs."""
    results = []
    for _ in range(2):
        test_kwargs, _ = prepare_inputs(case, seeded_generator(case.name, "determinism"), dtype, device)
        outputs = as_tuple(op.fn(**test_kwargs, backend=backend))
        sources = [v for v in test_kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        results.append(torch.autograd.grad([o.sum() * 1.5 for o in outputs], sources, allow_unused=True))
    for first, second in zip(*results):
        assert (first is None) == (second is None)
        if first is not None:
            assert torch.equal(first, second), "backward is not bitwise reproducible"


def check_double_backward_raises(op, case, backend, device):
    """A kernel backend's backward is not differentiable: a second backward through it raises, naming the
    backward op, instead of treating the first gradient as a constant (silently wrong second derivatives)."""
    test_kwargs, _ = prepare_inputs(case, seeded_generator(case.name, "double backward"), torch.float32, device)
    outputs = as_tuple(op.fn(**test_kwargs, backend=backend))
    sources = [v for v in test_kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    # Squared, so that the true second derivative is nonzero.
    grads = torch.autograd.grad([(o.float() ** 2).sum() for o in outputs if o.requires_grad], sources,
                                create_graph=True, allow_unused=True)
    second_order = sum(g.float().sum() for g in grads if g is not None and g.requires_grad)
    with pytest.raises(RuntimeError, match=r"stepfusion[.:]+\w+_backward"):
        second_order.backward()


def check_torch_func(op, case, backend, device):
    """torch.func composes with the backend (float32): vjp, a pullback vmapped over cotangents (as jacrev runs
    it), and per-sample vjps under vmap (two values of the first input batched, the others shared) give the
    fp64 reference's outputs and gradients. On the kernel backends a second derivative raises naming the
    backward op, and forward-mode AD (jvp) raises naming the op; the reference supports jvp."""
    dtype = torch.float32
    tolerance = op.tolerance(dtype)
    generator = seeded_generator(case.name, "torch.func", backend, device)
    test_kwargs, ref_kwargs = prepare_inputs(case, generator, dtype, device)
    names = [name for name, value in test_kwargs.items()
             if isinstance(value, torch.Tensor) and value.is_floating_point()]

    def functional(fn, kwargs):
        return lambda *tensors: as_tuple(fn(**{**kwargs, **dict(zip(names, tensors))}))

    def with_vjp(fn, cotangents):
        def outputs_and_grads(*tensors):
            outputs, pullback = torch.func.vjp(fn, *tensors)
            return outputs, pullback(cotangents)

        return outputs_and_grads

    under_test = functional(lambda **kwargs: op.fn(**kwargs, backend=backend), test_kwargs)
    reference = functional(op.ref, ref_kwargs)
    primals = tuple(test_kwargs[name].detach() for name in names)
    ref_primals = [ref_kwargs[name].detach() for name in names]
    other_first = randn(generator, *ref_primals[0].shape).to(dtype)
    ref_cotangents = tuple(randn(generator, *out.shape) for out in reference(*ref_primals))
    cotangents = tuple(c.to(device=device, dtype=dtype) for c in ref_cotangents)

    def assert_matches(results, expected, what):
        for index, (value, ref) in enumerate(zip(results, expected, strict=True)):
            error = relative_error(value, ref)
            assert error <= tolerance, f"{what} {index}: relative error {error:.3g} > {tolerance:g}"

    outputs, vjp_grads = with_vjp(under_test, cotangents)(*primals)
    ref_outputs, ref_grads = with_vjp(reference, ref_cotangents)(*ref_primals)
    assert_matches(outputs, ref_outputs, "vjp: output")
    assert_matches(vjp_grads, ref_grads, "vjp: gradient of input")

    # jacrev's form: one pullback of a batch of cotangents (the backward ops under vmap).
    other_cotangents = tuple(randn(generator, *c.shape) for c in ref_cotangents)
    _, pullback = torch.func.vjp(under_test, *primals)
    batched_grads = torch.func.vmap(pullback)(tuple(
        torch.stack([c, other.to(device=device, dtype=dtype)]) for c, other in zip(cotangents, other_cotangents)))
    for index, cotangent in enumerate((ref_cotangents, other_cotangents)):
        ref_grads = with_vjp(reference, cotangent)(*ref_primals)[1]
        assert_matches([grad[index] for grad in batched_grads], ref_grads, f"vmapped pullback {index}: gradient")

    batched_first = torch.stack([primals[0], other_first.to(device)])
    in_dims = (0,) + (None,) * (len(primals) - 1)
    outputs, grads = torch.func.vmap(with_vjp(under_test, cotangents), in_dims=in_dims)(batched_first, *primals[1:])
    for index, first in enumerate((ref_primals[0], other_first.to(torch.float64))):
        ref_outputs, ref_grads = with_vjp(reference, ref_cotangents)(first, *ref_primals[1:])
        assert_matches([out[index] for out in outputs], ref_outputs, f"vmap sample {index}: output")
        assert_matches([grad[index] for grad in grads], ref_grads, f"vmap sample {index}: gradient of input")

    tangents = tuple(randn(generator, *primal.shape).to(device=device, dtype=dtype) for primal in primals)
    if backend == "reference":
        _, jvp_outputs = torch.func.jvp(under_test, primals, tangents)
        # <cotangent, J t> = <J^T cotangent, t>
        forward = sum((c.double() * t.double()).sum() for c, t in zip(cotangents, jvp_outputs))
        reverse = sum((g.double() * t.double()).sum() for g, t in zip(vjp_grads, tangents))
        assert abs(forward - reverse) <= 1e-4 * (abs(reverse) + 1), (forward, reverse)
        return
    with pytest.raises(RuntimeError, match=r"stepfusion[.:]+\w+_backward"):
        torch.func.vjp(lambda *tensors: with_vjp(under_test, cotangents)(*tensors)[1], *primals)[1](
            tuple(torch.ones_like(primal) for primal in primals))
    with pytest.raises(RuntimeError, match=f"{op.fn.__name__}: forward-mode AD"):
        torch.func.jvp(under_test, primals, tangents)
    with torch.autograd.forward_ad.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        under_test(torch.autograd.forward_ad.make_dual(primals[0], tangents[0]), *primals[1:])


# The dtype of each device that no kernel backend there takes.
NO_KERNEL_DTYPE = {"cpu": torch.float16, "cuda": torch.float64}


def check_auto_runs_the_reference(fn, make_kwargs, device, dtype=None):
    """backend="auto" on tensors no kernel backend of `device` takes (its NO_KERNEL_DTYPE unless `dtype` is
    given) runs the reference: the same values as asking for it, not an error."""
    kwargs = {name: value.to(device) if isinstance(value, torch.Tensor) else value
              for name, value in make_kwargs(dtype=dtype or NO_KERNEL_DTYPE[device]).items()}
    for result, expected in zip(as_tuple(fn(**kwargs, backend="auto")), as_tuple(fn(**kwargs, backend="reference")),
                                strict=True):
        assert result.dtype == expected.dtype and result.device == expected.device
        assert torch.equal(result, expected)


def check_backend_selection_errors(fn, make_kwargs):
    """The errors of backend choice every op shares: an unknown backend, a dtype the backend lacks
    (float16 on the cpu backend), and the cuda backend asked for with CPU tensors."""
    with pytest.raises(ValueError, match="backend"):
        fn(**make_kwargs(dtype=torch.float32), backend="fortran")
    with pytest.raises(ValueError, match="float16"):
        fn(**make_kwargs(dtype=torch.float16), backend="cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        fn(**make_kwargs(dtype=torch.float32), backend="cuda")
