"""torch.export of every op on every backend here: the exported program computes what the op computes, and
its run-time checks of values (the pairs' range, the teacher weights) are part of it."""

import pytest
import torch

import stepfusion_kernels as sk
from harness import backend_params, randn, seeded_generator


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
@pytest.mark.parametrize("op", ["shift_expand", "guidance_attention", "skew_pair_project", "cohort_mutual_loss"])
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
