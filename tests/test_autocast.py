"""Every op inside torch.autocast: the inputs take the dtype PyTorch gives the ops it is made of (autocast's
for attention and the projection, float32 for the loss, the widest input's for shift_expand), the result is
the op's own on inputs cast that way, and each input's gradient comes back in its own dtype."""

import pytest
import torch

import stepfusion_kernels as sk
from harness import NEEDS_GPU, host_backends, randn, seeded_generator

AUTOCAST_DTYPE = torch.bfloat16  # the CPU's autocast dtype (float16 is not a dtype of the cpu backend)
# (backend, device, autocast dtype): on a GPU, autocast's own default, float16.
PLACES = [pytest.param(backend, "cpu", AUTOCAST_DTYPE, id=f"{backend}-cpu")
          for backend in host_backends("reference", "cpu", "triton")]
PLACES += [pytest.param(backend, "cuda", torch.float16, id=f"{backend}-cuda", marks=NEEDS_GPU)
           for backend in ("reference", "cuda", "triton")]


def shift_expand_inputs(generator):
    f32, bf16 = torch.float32, torch.bfloat16
    kwargs = {"x": (f32, (2, 17, 33)), "scale_local": (bf16, (2, 17, 33)), "shift_global": (bf16, (2, 33)),
              "gate": (f32, (33,))}
    return {name: randn(generator, *shape).to(dtype) for name, (dtype, shape) in kwargs.items()}, torch.float32


def guidance_attention_inputs(generator):
    shapes = {"q": (1, 2, 9, 16), "k": (1, 2, 17, 16), "v": (1, 2, 17, 16), "k_global": (1, 2, 3, 16),
              "v_global": (1, 2, 3, 16)}
    kwargs = {name: randn(generator, *shape).float() for name, shape in shapes.items()}
    kwargs["k"] = kwargs["k"].bfloat16()
    return {**kwargs, "window": 2}, "autocast"


def skew_pair_project_inputs(generator):
    shapes = {"ha": (4, 5, 8), "hb": (3, 5, 8), "weight_a": (6, 8), "bias_a": (6,), "weight_b": (6, 8)}
    kwargs = {name: randn(generator, *shape).float() for name, shape in shapes.items()}
    return {**kwargs, "pairs": torch.tensor([[3, 2], [0, 0], [3, 1]])}, "autocast"


def cohort_mutual_loss_inputs(generator):
    return {"outputs": randn(generator, 3, 5, 7).bfloat16(), "teacher_weights": torch.tensor([1.0, 0.0, 2.0])}, \
        torch.float32


OPS = {"shift_expand": shift_expand_inputs, "guidance_attention": guidance_attention_inputs,
       "skew_pair_project": skew_pair_project_inputs, "cohort_mutual_loss": cohort_mutual_loss_inputs}


def floating(kwargs):
    return [name for name, value in kwargs.items() if isinstance(value, torch.Tensor) and value.is_floating_point()]


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


@pytest.mark.parametrize(("backend", "device", "autocast_dtype"), PLACES)
@pytest.mark.parametrize("op", OPS)
def test_inside_autocast_the_op_runs_on_cast_inputs(op, backend, device, autocast_dtype):
    generator = seeded_generator("autocast", op, backend)
    kwargs, dtype = OPS[op](generator)
    dtype = autocast_dtype if dtype == "autocast" else dtype
    kwargs = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    names = floating(kwargs)
    for name in names:
        kwargs[name].requires_grad_()
    fn = getattr(sk, op)
    with torch.autocast(device, dtype=autocast_dtype):
        outputs = as_tuple(fn(**kwargs, backend=backend))
    cast = {name: value.detach().to(dtype).requires_grad_() if name in names else value
            for name, value in kwargs.items()}
    expected = as_tuple(fn(**cast, backend=backend))
    for out, ref in zip(outputs, expected, strict=True):
        assert out.dtype == dtype
        assert torch.equal(out, ref)
    upstream = [randn(generator, *out.shape).to(device=device, dtype=dtype) for out in outputs]
    grads = torch.autograd.grad(outputs, [kwargs[name] for name in names], upstream, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, [cast[name] for name in names], upstream, allow_unused=True)
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        if name == "teacher_weights":  # the teachers' weights get no gradient, with or without autocast
            assert grad is None and expected_grad is None
            continue
        assert grad.dtype == kwargs[name].dtype, name
        assert torch.equal(grad, expected_grad.to(grad.dtype)), name


@pytest.mark.parametrize("op", OPS)
def test_autocast_leaves_float64_alone(op):
    kwargs, _ = OPS[op](seeded_generator("autocast-float64", op))
    kwargs = {name: value.double() if name in floating(kwargs) else value for name, value in kwargs.items()}
    fn = getattr(sk, op)
    with torch.autocast("cpu", dtype=AUTOCAST_DTYPE):
        outputs = as_tuple(fn(**kwargs))
    for out, ref in zip(outputs, as_tuple(fn(**kwargs)), strict=True):
        assert out.dtype == torch.float64 and torch.equal(out, ref)
    # As in PyTorch's ops, a float64 input among others is not cast, so the dtypes must still agree.
    second = floating(kwargs)[1]
    with pytest.raises(ValueError, match=f"{second} must have the same dtype"), \
            torch.autocast("cpu", dtype=AUTOCAST_DTYPE):
        fn(**{**kwargs, second: kwargs[second].float()})


def test_outside_autocast_mixed_dtypes_are_still_refused():
    kwargs, _ = shift_expand_inputs(seeded_generator("no-autocast"))
    with pytest.raises(ValueError, match="scale_local must have the same dtype"):
        sk.shift_expand(**kwargs)


@pytest.mark.parametrize("op", OPS)
def test_compiled_inside_autocast(op):
    kwargs, dtype = OPS[op](seeded_generator("autocast-compile", op))
    dtype = AUTOCAST_DTYPE if dtype == "autocast" else dtype
    names = floating(kwargs)
    fn = getattr(sk, op)

    def call(*tensors):
        return fn(**{**kwargs, **dict(zip(names, tensors))})

    tensors = [kwargs[name] for name in names]
    with torch.autocast("cpu", dtype=AUTOCAST_DTYPE):
        expected = as_tuple(call(*tensors))
        outputs = as_tuple(torch.compile(call, fullgraph=True)(*tensors))
    for out, ref in zip(outputs, expected, strict=True):
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref)


def test_step_fusion_net_trains_inside_autocast():
    from stepfusion_kernels.models import StepFusionConfig, StepFusionNet

    torch.manual_seed(0)
    model = StepFusionNet(StepFusionConfig(in_a=3, in_b=5, max_len_a=17, max_len_b=9, head="classify", dim=16,
                                           heads=2, steps=2, window=2, global_tokens=2, dropout=0.0,
                                           num_classes=4))
    a, b = torch.randn(3, 17, 3), torch.randn(3, 9, 5)
    with torch.autocast("cpu", dtype=AUTOCAST_DTYPE):
        logits = model(a, b)
    eager = model(a, b)
    assert logits.dtype == AUTOCAST_DTYPE
    torch.testing.assert_close(logits.float(), eager, rtol=0.05, atol=0.05)
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())
