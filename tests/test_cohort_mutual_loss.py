import pytest
import torch
import torch.nn.functional as F

import python_ref
import stepfusion_kernels as sk
from harness import (KERNELS, NEEDS_GPU, Case, OpUnderTest, backend_dtype_params, backend_params,
                     check_against_reference, check_auto_runs_the_reference, check_backend_selection_errors,
                     check_deterministic_backward, check_double_backward_raises, check_torch_func, host_backends,
                     kernel_op_params, randn, relative_error, seeded_generator)

OP = OpUnderTest(fn=sk.cohort_mutual_loss, ref=python_ref.cohort_mutual_loss)
KINDS = ("kl", "mse")


def make_case(students, batch, classes, kind, zero_teachers=(), logit_scale=2.0, noncontiguous=False):
    def build(generator):
        weights = torch.rand(students, generator=generator, dtype=torch.float64) + 0.1
        weights[list(zero_teachers)] = 0.0
        return {"outputs": randn(generator, students, batch, classes) * logit_scale + 0.5,
                "teacher_weights": weights, "kind": kind}

    name = f"S{students}-N{batch}-C{classes}-{kind}"
    if zero_teachers:
        name += "-zero" + "".join(map(str, zero_teachers))
    if logit_scale != 2.0:
        name += f"-scale{logit_scale:g}"
    if noncontiguous:
        name += "-strided"
    return Case(name, build, ("outputs",) if noncontiguous else ())


CASES = [case for kind in KINDS for case in (
    make_case(4, 17, 33, kind),
    make_case(5, 3, 10, kind, zero_teachers=(0, 3)),  # students that do not teach
    make_case(3, 6, 1, kind),  # C = 1: every softmax is 1 (kl penalty 0); mse still sees the values
    make_case(2, 1, 5, kind),  # N = 1
    make_case(7, 9, 257, kind),  # C = 2^k + 1: one past a power of two
    make_case(3, 4, 65, kind, noncontiguous=True),
    make_case(6, 33, 1000, kind),  # wider than one vector tail, many rows
    make_case(4, 5, 40, kind, logit_scale=30.0),  # saturated softmaxes: tiny probabilities underflow
    # Students that nearly agree (the small logits of fresh networks): each KL is a small number, which a
    # kernel must not lose to rounding (test_students_that_nearly_agree_keep_float32_accuracy goes further).
    make_case(3, 14, 65, kind, zero_teachers=(1, 2), logit_scale=0.1),
)]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_params())
def test_matches_reference(case, backend, device, dtype):
    check_against_reference(OP, case, backend, device, dtype)


@pytest.mark.parametrize("classes", [65, 1000])
@pytest.mark.parametrize(("backend", "device", "rows"), [
    pytest.param(*param.values, rows, id=f"{param.id}-{rows}", marks=param.marks)
    for param in backend_params(only=KERNELS)
    for rows in (("whole", "chunked") if param.values[0] == "triton" else ("whole",))])
def test_students_that_nearly_agree_keep_float32_accuracy(backend, device, rows, classes, request):
    """Logits that differ by about 0.03 between students: every KL is about 1e-3, which an entropy minus a
    cross-entropy (terms of size log C) loses to rounding. The kernels' penalties meet the float32 bound of
    SPEC.md here too (errors of 1e-7 to 2e-6 on the CPU), where the definition evaluated literally in float32,
    as python_ref does, is off by 3e-5 to 5e-5. (Gradients, softmax(outputs[i]) - q, carry the rounding of
    each log-sum-exp, about 1e-5 relative at this spread for every float32 implementation, the literal one
    included; CASES checks them at a spread of 0.1.)"""
    if rows == "chunked":  # the Triton kernels that loop over a row in chunks
        request.getfixturevalue("chunked_rows")
    generator = seeded_generator("nearly agree", classes)
    outputs = (randn(generator, 6, 16, classes) * 0.03 + 0.5).float()
    weights = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 0.3])
    expected = python_ref.cohort_mutual_loss(outputs.double(), weights.double())
    penalty = sk.cohort_mutual_loss(outputs.to(device), weights.to(device), backend=backend)
    assert relative_error(penalty, expected) <= OP.tolerance(torch.float32)


def _pairwise_definition(outputs, teacher_weights, kind):
    """SPEC section 4 written out as its O(S^2) double loop, teachers detached."""
    students, batch, classes = outputs.shape
    teachers = outputs.detach()
    total_weight = teacher_weights.sum()
    penalties = []
    for i in range(students):
        penalty = outputs.new_zeros(())
        for j in range(students):
            if kind == "kl":
                # kl_div(input=log p_i, target=log p_j, log_target=True) = sum p_j (log p_j - log p_i).
                divergence = F.kl_div(F.log_softmax(outputs[i], dim=-1), F.log_softmax(teachers[j], dim=-1),
                                      reduction="sum", log_target=True)
            else:
                divergence = F.mse_loss(outputs[i], teachers[j], reduction="sum")
            penalty = penalty + teacher_weights[j] * divergence
        penalties.append(penalty / (batch * total_weight * (classes if kind == "mse" else 1)))
    return torch.stack(penalties)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_matches_pairwise_definition(kind, backend, device):
    generator = seeded_generator("pairwise", kind, backend)
    outputs = randn(generator, 5, 11, 9) * 3
    weights = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25], dtype=torch.float64)
    dtype = torch.float64 if backend == "cpu" else torch.float32
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    expected_input = outputs.clone().requires_grad_()
    expected = _pairwise_definition(expected_input, weights, kind)
    test_input = outputs.to(device=device, dtype=dtype).requires_grad_()
    penalty = sk.cohort_mutual_loss(test_input, weights.to(device=device, dtype=dtype), kind=kind, backend=backend)
    torch.testing.assert_close(penalty.double().cpu(), expected, rtol=tolerance, atol=tolerance)
    upstream = randn(generator, 5)
    (grad,) = torch.autograd.grad(penalty, test_input, upstream.to(device=device, dtype=dtype))
    (expected_grad,) = torch.autograd.grad(expected, expected_input, upstream)
    torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=tolerance, atol=tolerance)


# A penalty that is 0 in exact arithmetic (and its gradient) is checked with an absolute tolerance: a
# relative error against an fp64 reference of 1e-17 would only measure rounding.
@pytest.mark.parametrize("weights", [[1.0, 0.0, 3.0, 0.5], [2.0]], ids=["S4", "S1"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_identical_students_have_zero_penalty(weights, kind, backend, device):
    row = randn(seeded_generator("identical", kind), 1, 6, 13)
    outputs = row.expand(len(weights), 6, 13).float().to(device).requires_grad_()
    weights = torch.tensor(weights, device=device)
    penalty = sk.cohort_mutual_loss(outputs, weights, kind=kind, backend=backend)
    torch.testing.assert_close(penalty, torch.zeros_like(penalty), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(penalty.sum(), outputs)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_no_gradient_reaches_the_weights(kind, backend, device):
    generator = seeded_generator("weights-grad", kind)
    outputs = randn(generator, 3, 4, 5).float().to(device).requires_grad_()
    weights = torch.tensor([1.0, 2.0, 0.5], device=device, requires_grad=True)
    penalty = sk.cohort_mutual_loss(outputs, weights, kind=kind, backend=backend)
    grad_outputs, grad_weights = torch.autograd.grad(penalty.sum(), (outputs, weights), allow_unused=True)
    assert grad_weights is None
    assert grad_outputs.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_empty_batch_gives_zeros(kind, backend, device):
    outputs = torch.randn(3, 0, 5, device=device, requires_grad=True)
    penalty = sk.cohort_mutual_loss(outputs, torch.ones(3, device=device), kind=kind, backend=backend)
    assert penalty.shape == (3,) and torch.equal(penalty, torch.zeros(3, device=device))
    (grad,) = torch.autograd.grad(penalty.sum(), outputs)
    assert grad.shape == outputs.shape


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_no_students_gives_empty_output(kind, backend, device):
    for classes in (0, 4):
        outputs = torch.randn(0, 5, classes, device=device, requires_grad=True)
        penalty = sk.cohort_mutual_loss(outputs, torch.ones(0, device=device), kind=kind, backend=backend)
        assert penalty.shape == (0,)
        (grad,) = torch.autograd.grad(penalty.sum(), outputs)
        assert grad.shape == outputs.shape


@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
@pytest.mark.parametrize("kind", KINDS)
def test_backward_is_bitwise_reproducible(kind, backend, device):
    check_deterministic_backward(OP, make_case(6, 70, 40, kind), backend, device, torch.float32)


@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_raises(kind, backend, device):
    check_double_backward_raises(OP, make_case(3, 5, 4, kind), backend, device)


@pytest.mark.parametrize("case", [make_case(3, 5, 4, "kl", zero_teachers=(1,), noncontiguous=True),
                                  make_case(4, 3, 7, "mse")], ids=str)
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_torch_func_transforms(case, backend, device):
    check_torch_func(OP, case, backend, device)


@pytest.mark.skipif("cpu" not in sk.backends(), reason="the C++ extension was not built")
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_forward_bits_do_not_depend_on_thread_count(kind):
    generator = seeded_generator("threads", kind)
    outputs, weights = randn(generator, 8, 301, 37).float(), torch.rand(8, generator=generator).float()
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(sk.cohort_mutual_loss(outputs, weights, kind=kind, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize(("op", "device", "dtype"), kernel_op_params("cohort_mutual_loss"))
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(op, device, dtype, kind):
    generator = seeded_generator("opcheck", kind)
    for shape, weights in (((3, 5, 7), [1.0, 0.0, 2.0]), ((1, 4, 9), [0.5]), ((4, 1, 1), [1.0, 1.0, 1.0, 1.0])):
        outputs = randn(generator, *shape).to(device=device, dtype=dtype).requires_grad_()
        torch.library.opcheck(op, (outputs, torch.tensor(weights, device=device, dtype=dtype), kind))


@pytest.mark.skipif("cpu" not in sk.backends(), reason="the C++ extension was not built")
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_cpu_float64(kind):
    # gradcheck perturbs every input element, but a teacher's values must not move its students'
    # penalties' gradients (teachers are detached). So the students checked here do not teach (weight 0)
    # and the teachers are constants: then the op's Jacobian is the full derivative of the function.
    generator = seeded_generator("gradcheck", kind)
    students = randn(generator, 3, 4, 6).requires_grad_()
    teachers = randn(generator, 2, 4, 6)
    weights = torch.tensor([0.0, 0.0, 0.0, 1.5, 0.5], dtype=torch.float64)

    def student_penalties(students):
        return sk.cohort_mutual_loss(torch.cat([students, teachers]), weights, kind=kind, backend="cpu")[:3]

    assert torch.autograd.gradcheck(student_penalties, (students,))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_a_student_that_does_not_teach_cannot_reach_the_others(backend, device, kind, value):
    """A NaN or Inf in the outputs of a student of weight 0 (one that diverged, say) leaves every other
    student's penalty and gradient exactly as they are with finite outputs there: the terms of a student
    that does not teach are left out, not multiplied by 0 (which gives NaN)."""
    generator = seeded_generator("non-teacher", kind)
    outputs = randn(generator, 4, 5, 17).float()
    poisoned = outputs.clone()
    poisoned[1, 2, 3] = value
    weights = torch.tensor([1.0, 0.0, 0.5, 2.0], device=device)
    results = []
    for values in (outputs, poisoned):
        leaf = values.to(device).requires_grad_()
        penalty = sk.cohort_mutual_loss(leaf, weights, kind=kind, backend=backend)
        (grad,) = torch.autograd.grad(penalty.sum(), leaf)
        results.append((penalty.cpu(), grad.cpu()))
    (penalty, grad), (poisoned_penalty, poisoned_grad) = results
    others = [0, 2, 3]
    assert torch.isfinite(penalty).all() and not torch.isfinite(poisoned_penalty[1])
    assert torch.equal(poisoned_penalty[others], penalty[others])
    assert torch.equal(poisoned_grad[others], grad[others])


@pytest.mark.parametrize(("backend", "device"), backend_params(only=KERNELS))
@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_fullgraph(backend, device, kind):
    generator = seeded_generator("compile", backend, kind)
    logits = randn(generator, 4, 6, 10).float().to(device).requires_grad_()
    weights = torch.tensor([1.0, 0.0, 0.5, 2.0], device=device)

    def loss(logits, weights):
        return sk.cohort_mutual_loss(logits * 2, weights, kind=kind, backend=backend).square()

    compiled = torch.compile(loss, fullgraph=True)
    expected = loss(logits, weights)
    result = compiled(logits, weights)
    torch.testing.assert_close(result, expected)
    (grad,) = torch.autograd.grad(result.sum(), logits)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", host_backends("reference", "cpu", "triton"))
def test_compiled_graph_still_checks_the_weights(backend, dynamic):
    # A compiled graph cannot read the weights while it is traced: every backend checks them at run time.
    compiled = torch.compile(lambda o, w: sk.cohort_mutual_loss(o, w, backend=backend), fullgraph=True,
                             dynamic=dynamic)
    outputs = torch.randn(2, 3, 4)
    weights = torch.tensor([1.0, 0.5])
    torch.testing.assert_close(compiled(outputs, weights), python_ref.cohort_mutual_loss(outputs, weights))
    for bad, match in ((torch.tensor([1.0, -1.0]), "finite and >= 0"), (torch.zeros(2), "positive sum")):
        with pytest.raises(ValueError, match=f"teacher_weights must (be|have a) {match}"):
            compiled(outputs, bad)


def test_opcheck_reference_weight_check():
    # The op that checks the reference's weights in a compiled graph (test_compiled_graph_still_checks_the_weights).
    torch.library.opcheck(torch.ops.stepfusion.cohort_mutual_loss_checked_weights.default, (torch.tensor([1.0, 0.0]),))


@pytest.mark.parametrize("kind", KINDS)
def test_module_matches_functional_and_trains(kind):
    module = sk.nn.CohortMutualLoss(kind=kind)
    generator = seeded_generator("module", kind)
    outputs = randn(generator, 3, 5, 4).float().requires_grad_()
    weights = torch.tensor([0.2, 0.3, 0.5])
    penalty = module(outputs, weights)
    torch.testing.assert_close(penalty, python_ref.cohort_mutual_loss(outputs, weights, kind=kind))
    penalty.sum().backward()
    assert outputs.grad is not None and outputs.grad.abs().sum() > 0
    assert kind in repr(module)
    with pytest.raises(ValueError, match="kind"):
        sk.nn.CohortMutualLoss(kind="l1")


# Bad inputs: every message must name the argument at fault.
def _good(students=3, dtype=torch.float32):
    return {"outputs": torch.randn(students, 4, 5, dtype=dtype), "teacher_weights": torch.ones(students, dtype=dtype)}


BAD_INPUTS = [
    ("outputs rank", {"outputs": torch.randn(3, 20)}, ValueError, "outputs"),
    ("outputs rank 4", {"outputs": torch.randn(3, 2, 4, 5)}, ValueError, "outputs"),
    ("integer outputs", {"outputs": torch.ones(3, 4, 5, dtype=torch.int64)}, ValueError, "outputs"),
    ("no classes", {"outputs": torch.randn(3, 4, 0)}, ValueError, "outputs"),
    ("weights length", {"teacher_weights": torch.ones(4)}, ValueError, "teacher_weights"),
    ("weights rank", {"teacher_weights": torch.ones(3, 1)}, ValueError, "teacher_weights"),
    ("weights dtype", {"teacher_weights": torch.ones(3, dtype=torch.float64)}, ValueError, "teacher_weights"),
    ("weights device", {"teacher_weights": torch.ones(3, device="meta")}, RuntimeError, "teacher_weights"),
    ("negative weight", {"teacher_weights": torch.tensor([1.0, -0.5, 1.0])}, ValueError, "teacher_weights"),
    ("all-zero weights", {"teacher_weights": torch.zeros(3)}, ValueError, "teacher_weights"),
    ("NaN weight", {"teacher_weights": torch.tensor([1.0, float("nan"), 1.0])}, ValueError, "teacher_weights"),
    ("infinite weight", {"teacher_weights": torch.tensor([1.0, float("inf"), 1.0])}, ValueError, "teacher_weights"),
    ("weights not a tensor", {"teacher_weights": [1.0, 1.0, 1.0]}, ValueError, "teacher_weights"),
    ("unknown kind", {"kind": "l1"}, ValueError, "kind"),
    ("kind not a string", {"kind": None}, ValueError, "kind"),
]


@pytest.mark.parametrize(("change", "error", "name"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("backend", host_backends("reference", "cpu", "triton"))
def test_bad_input_names_the_argument(change, error, name, backend):
    kwargs = {**_good(), **change}
    with pytest.raises(error, match=name):
        sk.cohort_mutual_loss(**kwargs, backend=backend)


def test_backend_selection_errors():
    check_backend_selection_errors(sk.cohort_mutual_loss, _good)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_GPU)])
def test_auto_runs_the_reference_for_a_dtype_no_kernel_takes(device):
    check_auto_runs_the_reference(sk.cohort_mutual_loss, _good, device)


@pytest.mark.skipif("cpu" not in sk.backends(), reason="the C++ extension was not built")
@pytest.mark.parametrize(("outputs", "weights", "kind", "name"), [
    (torch.randn(3, 4, 5), torch.ones(2), "kl", "teacher_weights"),
    (torch.randn(3, 4), torch.ones(3), "kl", "outputs"),
    (torch.randn(3, 4, 5), torch.tensor([1.0, float("nan"), 0.0]), "kl", "teacher_weights"),
    (torch.randn(3, 4, 5), torch.zeros(3), "mse", "teacher_weights"),
    (torch.randn(3, 4, 5), torch.ones(3), "js", "kind"),
], ids=["weights length", "outputs rank", "NaN weight", "zero weights", "kind"])
def test_cpp_op_checks_its_arguments_itself(outputs, weights, kind, name):
    with pytest.raises(ValueError, match=name):
        torch.ops.stepfusion.cohort_mutual_loss(outputs, weights, kind)


@NEEDS_GPU
@pytest.mark.parametrize("kind", KINDS)
def test_large_inputs_use_64_bit_offsets(kind):
    # S * N * C > 2^31 elements: only the last batch row is non-zero, so the penalty is that row's penalty
    # divided by N, and the last row's offsets lie past 2^31.
    students, batch, classes = 2, (1 << 20) + 1, 1024
    outputs = torch.zeros(students, batch, classes, device="cuda", dtype=torch.bfloat16)
    last = torch.randn(students, 1, classes, device="cuda", dtype=torch.bfloat16)
    outputs[:, -1:] = last
    weights = torch.tensor([1.0, 2.0], device="cuda", dtype=torch.bfloat16)
    expected = python_ref.cohort_mutual_loss(last.double(), weights.double(), kind=kind)
    for backend in ("cuda", "triton"):
        penalty = sk.cohort_mutual_loss(outputs, weights, kind=kind, backend=backend)
        torch.testing.assert_close(penalty.double() * batch, expected, rtol=2e-2, atol=2e-2)
        del penalty


# Chunks of 16 (the chunked_rows fixture): C = 33 and 65 end in a partial chunk, C = 1, 5 and 10 are one
# partial chunk. The interpreter is slow per chunk: CASES up to C = 65, and one case of each kind for the
# 16-bit dtypes.
CHUNKED_CASES = [case for case in CASES if "-C257-" not in case.name and "-C1000-" not in case.name]


@pytest.mark.parametrize(("case", "backend", "device", "dtype"), [
    pytest.param(case, *param.values, id=f"{case}-{param.id}", marks=param.marks)
    for param in backend_dtype_params(only=("triton",))
    for case in CHUNKED_CASES if param.values[2] == torch.float32 or case.name.startswith("S4-N17-C33-")])
def test_triton_chunked_rows_match_reference(case, backend, device, dtype, chunked_rows):
    check_against_reference(OP, case, backend, device, dtype)


@pytest.mark.parametrize(("backend", "device"), backend_params(only=("triton",)))
@pytest.mark.parametrize("kind", KINDS)
def test_triton_rows_wider_than_one_block(kind, backend, device):
    # Past FUSED_MAX (8192) a row of classes is no longer held whole; before the chunked kernels, rows past
    # 65536 were refused. 70001 classes: 69 chunks of 1024, the last one partial.
    check_against_reference(OP, make_case(3, 2, 70001, kind), backend, device, torch.float32)
