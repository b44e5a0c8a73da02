"""Random inputs for every op, backend and dtype against python_ref in float64: the inputs the test cases
miss (odd shapes, optional arguments present or absent, strided views, logits that nearly agree or saturate).

    python scripts/fuzz_ops.py --rounds 300                      # every op, this machine's backends
    python scripts/fuzz_ops.py --ops cohort_mutual_loss --rounds 500 --seed 7
    python scripts/fuzz_ops.py --seed 7 --round 123              # rerun one reported round
    python scripts/fuzz_ops.py --device cuda --rounds 100000 --seconds 60   # what fits in a minute

Each round draws an op, an input configuration (the `make_case` of the op's test file, with random
arguments), a backend and one of its dtypes, and measures every output's and gradient's error
||out - ref|| / ||ref|| as the tests do. A round fails when an error is over SPEC.md's tolerance and also
over 4 times the error of the reference backend on the same inputs in the same dtype: the definition
evaluated as written, in the precision the kernel was given, is the bar. (Some inputs are ill-conditioned
for any implementation: LayerNorm over D = 2 channels, gradients in float16's subnormal range. There the
reference misses the tolerance too, and the round passes. A lone student's KL gradient is exactly 0, which
the kernels miss by rounding, 1e-8 or so: the rounds draw S >= 2.)
Exits 1 when a round fails. Without a GPU the Triton kernels run in Triton's interpreter."""

import argparse
import os
import random
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import harness  # noqa: E402
import stepfusion_kernels as sk  # noqa: E402
import test_cohort_mutual_loss  # noqa: E402
import test_guidance_attention  # noqa: E402
import test_shift_expand  # noqa: E402
import test_skew_pair_project  # noqa: E402

MARGIN = 4.0  # a kernel may be this many times less accurate than the reference in its own dtype


def _shift_expand(rng):
    present = tuple(name for name in test_shift_expand.ALL_OPTIONAL if rng.random() < 0.6)
    strided = tuple(name for name in ("x",) + present if rng.random() < 0.2)
    dim = rng.choice((1, 2, 3, 7, 16, 33, 64, 129, 257, 513, 1025))
    return test_shift_expand.make_case(rng.randint(1, 3), rng.randint(1, 40), dim, present=present,
                                       noncontiguous=strided, eps=rng.choice((1e-5, 1e-3)))


def _guidance_attention(rng):
    strided = tuple(name for name in ("q", "k", "v") if rng.random() < 0.3)
    return test_guidance_attention.make_case(
        rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 70), rng.randint(1, 70), rng.choice((16, 32, 64, 128)),
        rng.choice((0, 0, 1, 3, 17)), rng.choice((-1, 0, 1, 2, 5, 16, 100)), scale=rng.choice((None, None, 0.3)),
        noncontiguous=strided, q_layout=rng.choice(("bhld", "blhd")))


def _skew_pair_project(rng):
    layers_a, layers_b = rng.randint(1, 6), rng.randint(1, 6)
    pairs = tuple((rng.randrange(layers_a), rng.randrange(layers_b)) for _ in range(rng.randint(1, 7)))
    strided = tuple(name for name in ("ha", "hb", "weight_a") if rng.random() < 0.2)
    return test_skew_pair_project.make_case(
        layers_a, layers_b, rng.randint(1, 40), rng.randint(1, 70), rng.randint(1, 70), pairs=pairs,
        per_pair=rng.random() < 0.4, separate_b=rng.random() < 0.5, bias_a=rng.random() < 0.7,
        bias_b=rng.random() < 0.7, noncontiguous=strided)


def _cohort_mutual_loss(rng):
    students = rng.randint(2, 9)  # S = 1: a lone student's KL gradient is 0, which rounding can only miss
    silent = tuple(sorted(rng.sample(range(students), rng.randint(0, students - 1))))  # students that do not teach
    return test_cohort_mutual_loss.make_case(
        students, rng.randint(1, 40), rng.choice((1, 2, 3, 10, 33, 257, 1000, 1025)), rng.choice(("kl", "mse")),
        zero_teachers=silent, logit_scale=rng.choice((2.0, 0.1, 0.03, 20.0)), noncontiguous=rng.random() < 0.3)


OPS = {
    "shift_expand": (test_shift_expand.OP, _shift_expand),
    "guidance_attention": (test_guidance_attention.OP, _guidance_attention),
    "skew_pair_project": (test_skew_pair_project.OP, _skew_pair_project),
    "cohort_mutual_loss": (test_cohort_mutual_loss.OP, _cohort_mutual_loss),
}


def errors(op, case, values, backend, device, dtype, upstream_seed):
    """{quantity: relative error against the float64 reference} of every output and float input's gradient,
    for `values` (the case's float64 inputs) rounded to `dtype` and run on `backend`; inf where not finite."""
    fixed = harness.Case(case.name, lambda _: values, case.noncontiguous)
    test_kwargs, ref_kwargs = harness.prepare_inputs(fixed, None, dtype, device)
    outputs = harness.as_tuple(op.fn(**test_kwargs, backend=backend))
    references = harness.as_tuple(op.ref(**ref_kwargs))
    generator = torch.Generator().manual_seed(upstream_seed)
    upstream = [harness.randn(generator, *ref.shape) for ref in references]
    names = [name for name, value in test_kwargs.items() if isinstance(value, torch.Tensor) and value.requires_grad]
    grads = torch.autograd.grad(outputs, [test_kwargs[n] for n in names], [g.to(device, dtype) for g in upstream],
                                allow_unused=True)
    ref_grads = torch.autograd.grad(references, [ref_kwargs[n] for n in names], upstream, allow_unused=True)
    measured = {}
    pairs = [(f"output {i}", out, ref) for i, (out, ref) in enumerate(zip(outputs, references))]
    pairs += [(f"grad of {n}", g, r) for n, g, r in zip(names, grads, ref_grads) if r is not None]
    for quantity, value, ref in pairs:
        finite = value is not None and torch.isfinite(value.detach().cpu()).all()
        measured[quantity] = harness.relative_error(value, ref) if finite else float("inf")
    return measured


def run_round(seed, index, ops, backends, device, op_table=OPS):
    """(description, [(quantity, error, reference backend's error)] of the failures) of round `index`."""
    rng = random.Random(f"{seed}-{index}")
    name = rng.choice(ops)
    op, draw = op_table[name]
    case = draw(rng)
    backend = rng.choice(backends)
    dtype = rng.choice(harness.DTYPES[backend])
    values = case.build(torch.Generator().manual_seed(rng.randrange(2 ** 31)))
    upstream_seed = rng.randrange(2 ** 31)
    ours = errors(op, case, values, backend, device, dtype, upstream_seed)
    bar = errors(op, case, values, "reference", device, dtype, upstream_seed)
    tolerance = op.tolerance(dtype)
    failures = [(quantity, error, bar[quantity]) for quantity, error in ours.items()
                if error > tolerance and error > MARGIN * bar[quantity]]
    return f"round {index}: {name} {case} {backend} {str(dtype).replace('torch.', '')}", failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round", type=int, default=None, help="run only this round of --seed")
    parser.add_argument("--seconds", type=float, default=None, help="start no round after this many seconds")
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backends", nargs="+", choices=harness.KERNELS + ("reference",), default=None,
                        help="default: the kernel backends that take tensors on --device here")
    args = parser.parse_args(argv)
    usable = sk.backends()
    if args.backends is None:  # the kernel backends that take tensors on the device here
        here = ("cpu", "triton") if args.device == "cpu" else ("cuda", "triton")
        args.backends = [name for name in here if name in usable
                         and (name != "triton" or args.device == "cuda" or harness.triton_interpreted())]
    backends = args.backends
    missing = [name for name in backends if name not in usable]
    if missing or not backends:
        parser.error(f"backends {missing or backends} are not usable here (usable: {usable})")
    rounds = [args.round] if args.round is not None else range(args.rounds)
    failed, done, start = 0, 0, time.monotonic()
    for index in rounds:
        if args.seconds is not None and time.monotonic() - start > args.seconds:
            break
        done += 1
        description, failures = run_round(args.seed, index, args.ops, backends, args.device)
        for quantity, error, bar in failures:
            print(f"FAIL {description}: {quantity} error {error:.3g} (reference backend, same dtype: {bar:.3g})",
                  flush=True)
        failed += bool(failures)
    print(f"{failed} of {done} rounds failed (seed {args.seed}; backends {', '.join(backends)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
