"""torch.export of every op on every backend here: the exported program computes what the op computes, and
its run-time checks of values (the pairs' range, the teacher weights) are part of it; so does an
AOTInductor package of the exported ops."""

import pytest
import torch

import stepfusion_kernels as sk
from harness import backend_params, randn, seeded_generator

OPS = ("shift_expand", "guidance_attention", "skew_pair_project", "cohort_mutual_loss")


class OneOp(torch.nn.Module):
    def __init__(self, op, backend, **options):
        super().__init__()
        self.fn, self.backend, self.options = getattr(sk, op), backend, options

    def forward(self, **tensors):
        return self.fn(**tensors, **self.options, backend=self.backend)


def inputs(op, generator, device):
    """(tensors on `device`, options that are not tensors) of a small call."""
    tensors, options = cpu_inputs(op, generator)
    return {name: tensor.to(device) for name, tensor in tensors.items()}, options


def cpu_inputs(op, generator):
    if op == "shift_expand":
        return {"x": randn(generator, 2, 5, 16).float(), "scale_local": randn(generator, 2, 5, 16).float(),
                "shift_global": randn(generator, 2, 16).float()}, {}
    if op == "guidance_attention":
        return {"q": randn(generator, 1, 2, 5, 16).float(), "k": randn(generator, 1, 2, 9, 16).float(),
                "v": randn(generator, 1, 2, 9, 16).float()}, {"window": 1}
    if op == "skew_pair_project":
        return {"ha": randn(generator, 4, 3, 8).float(), "hb": randn(generator, 3, 3, 8).float(),
                "pairs": torch.tensor([[3, 2], [0, 1]]), "weight_a": randn(generator, 5, 8).float()}, {}
    return {"outputs": randn(generator, 3, 4, 5).float(), "teacher_weights": torch.tensor([1.0, 0.0, 2.0])}, {}


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("op", OPS)
def test_exported_program_matches_the_op(op, backend, device):
    tensors, options = inputs(op, seeded_generator("export", op, backend), device)
    module = OneOp(op, backend, **options)
    program = torch.export.export(module, (), tensors)
    fresh, _ = inputs(op, seeded_generator("export-fresh", op, backend), device)
    for out, expected in zip(as_tuple(program.module()(**fresh)), as_tuple(module(**fresh)), strict=True):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize(("op", "name", "bad", "match"), [
    ("skew_pair_project", "pairs", torch.tensor([[3, 2], [0, -1]]), r"pairs\[:, 1\] must lie in"),
    ("cohort_mutual_loss", "teacher_weights", torch.tensor([1.0, -1.0, 2.0]), "teacher_weights must be finite"),
], ids=["pairs", "weights"])
def test_exported_program_checks_values(op, name, bad, match, backend, device):
    tensors, options = inputs(op, seeded_generator("export-checks", op, backend), device)
    program = torch.export.export(OneOp(op, backend, **options), (), tensors)
    with pytest.raises((ValueError, RuntimeError), match=match):
        program.module()(**{**tensors, name: bad.to(device)})


class EveryOp(torch.nn.Module):
    """The four ops on one backend; their tensors named "<op>.<argument>", their other options per op."""

    def __init__(self, backend, options):
        super().__init__()
        self.backend, self.options = backend, options

    def forward(self, tensors):
        outputs = []
        for op in OPS:
            named = {name.split(".", 1)[1]: value for name, value in tensors.items() if name.startswith(op + ".")}
            outputs += as_tuple(getattr(sk, op)(**named, **self.options[op], backend=self.backend))
        return tuple(outputs)


def every_input(generator, device):
    """(tensors of every op, named "<op>.<argument>"; each op's other options)."""
    tensors, options = {}, {}
    for op in OPS:
        op_tensors, options[op] = inputs(op, generator, device)
        tensors.update({f"{op}.{name}": value for name, value in op_tensors.items()})
    return tensors, options


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_aot_inductor_package_runs_every_op(backend, device, tmp_path):
    """An AOTInductor package of the four ops (exported, compiled to a .pt2 file, loaded back) computes what
    the ops compute on fresh inputs of the exported shapes, and still checks the pairs' range."""
    tensors, options = every_input(seeded_generator("aoti", backend), device)
    module = EveryOp(backend, options)
    program = torch.export.export(module, (tensors,))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "ops.pt2"))
    loaded = torch._inductor.aoti_load_package(package)
    fresh, _ = every_input(seeded_generator("aoti-fresh", backend), device)
    for out, expected in zip(loaded(fresh), module(fresh), strict=True):
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"pairs\[:, 1\] must lie in"):
        loaded({**fresh, "skew_pair_project.pairs": torch.tensor([[3, 2], [0, -1]], device=device)})
