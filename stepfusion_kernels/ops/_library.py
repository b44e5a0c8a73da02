"""Registration shared by every op: fake (meta) kernels for its C++ and Triton op pairs, autograd for the
Triton pair (the C++ ops' autograd is registered in C++, csrc/autograd.cpp, where it costs a few
microseconds per call instead of about a hundred), and the one call of a kernel backend that every public
function makes, which also serves torch.func's transforms."""

import torch
from torch.autograd import forward_ad

from .._backend import EXTENSION_ERROR


class KernelOps:
    """An op's kernel backends as its public function calls them: `kernels(backend, *args)` runs the C++ op
    (backend "cpu" or "cuda") or the Triton op on `args` and returns all of its outputs.

    Outside torch.func's transforms and forward-mode AD that is one call of the registered op, with its own
    autograd. Under them it goes through `_UnderTransforms`: the registered autograd of the C++ ops is a
    C++ torch::autograd::Function, which torch.func refuses, and the Triton ops' torch.library autograd
    would give no tangent under forward-mode AD, silently."""

    def __init__(self, op, autograd_backward, setup_context):
        self.op = op
        self.setup_context = setup_context
        self._triton = self._pair(f"{op}_triton", autograd_backward)
        self._cpp = self._pair(op, autograd_backward) if EXTENSION_ERROR is None else None

    @staticmethod
    def _pair(name, autograd_backward):
        """(forward op, the backward function of `_UnderTransforms`): the op's own backward function, with
        the backward op run as a `_BackwardUnderTransforms`."""
        backward_op = getattr(torch.ops.stepfusion, f"{name}_backward")

        def backward_under_transforms(*args):
            return _BackwardUnderTransforms.apply(backward_op, *args)

        return getattr(torch.ops.stepfusion, name), autograd_backward(backward_under_transforms)

    def __call__(self, backend, *args):
        forward_op, backward = self._triton if backend == "triton" else self._cpp
        # torch.compile traces the op itself: Dynamo cannot trace `_UnderTransforms` (its dispatch guard), so a
        # torch.func transform of a kernel op inside a compiled function runs eagerly (a graph break).
        if torch.compiler.is_compiling() or not _transformed():
            return forward_op(*args)
        return _UnderTransforms.apply(self, forward_op, backward, *args)


def _transformed():
    """True inside a torch.func transform (grad, vjp, jacrev, vmap, jvp, ...) or a forward-mode AD level."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


class _UnderTransforms(torch.autograd.Function):
    """A kernel op as an autograd.Function with the op's own contract (its setup_context and backward), the
    form torch.func composes with: grad, vjp and jacrev differentiate through the op's backward kernel,
    and vmap runs the kernels once per vmapped index (PyTorch's batching fallback). A second derivative
    raises, as outside the transforms, because the backward op has none; so does forward-mode AD, which
    the kernels do not implement."""

    generate_vmap_rule = True

    @staticmethod
    def forward(kernels, forward_op, backward, *args):
        # The op's own autograd is this Function's job here.
        with torch._C._AutoDispatchBelowAutograd():
            return forward_op(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        kernels, _forward_op, backward, *args = inputs
        ctx.op_name, ctx.op_backward = kernels.op, backward
        kernels.setup_context(ctx, tuple(args), output)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None, *ctx.op_backward(ctx, *grads))

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(f"{ctx.op_name}: forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) "
                           "is not implemented by the kernel backends; use backend=\"reference\" for it")


class _BackwardUnderTransforms(torch.autograd.Function):
    """A backward op under torch.func's transforms, which always record the backward pass (as
    create_graph=True does). It has no derivative: differentiating through it raises, naming it, as the
    C++ backward ops do outside the transforms, where the Triton ones' torch.library autograd would fail
    under the transforms with a message about autograd.Function instead."""

    generate_vmap_rule = True

    @staticmethod
    def forward(backward_op, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return backward_op(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op_name = inputs[0]._qualified_op_name  # stepfusion::<op>_backward or stepfusion::<op>_triton_backward

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"the derivative for {ctx.op_name} is not implemented: the kernel backends have no "
                           "second derivative; use backend=\"reference\" for it")

    jvp = backward


def _register_batch_folding(name):
    """A vmap rule for stepfusion::<name>, an op whose tensor arguments and outputs all hold a batch of
    independent rows in dim 0: the vmapped dimension joins that batch, so a vmap (per-sample gradients, say)
    runs the kernel once instead of once per vmapped index (PyTorch's fallback). An argument not vmapped is
    expanded over the vmapped dimension. An empty output (an absent optional argument's gradient) stays
    as it is, not vmapped."""

    def rule(info, in_dims, *args):
        size = info.batch_size
        # Every tensor as (vmapped, batch, ...).
        moved = [(arg.expand(size, *arg.shape) if dim is None else arg.movedim(dim, 0))
                 if isinstance(arg, torch.Tensor) else arg for arg, dim in zip(args, in_dims)]
        batch = next(arg.shape[1] for arg in moved if isinstance(arg, torch.Tensor))
        folded = [arg.reshape(size * batch, *arg.shape[2:]) if isinstance(arg, torch.Tensor) else arg
                  for arg in moved]
        outputs = getattr(torch.ops.stepfusion, name)(*folded)
        unfolded = tuple(out if out.dim() == 1 and out.numel() == 0 else out.reshape(size, batch, *out.shape[1:])
                         for out in outputs)
        return unfolded, tuple(None if out is before else 0 for out, before in zip(unfolded, outputs))

    torch.library.register_vmap(f"stepfusion::{name}", rule)


def register_kernel_ops(op, fake_forward, fake_backward, autograd_backward, setup_context, batch_folding=False):
    """Registers `fake_forward`/`fake_backward` for stepfusion::<op>_triton and, where the extension is built,
    stepfusion::<op>; and autograd (`autograd_backward(backward_op)` builds the backward function) for
    stepfusion::<op>_triton, with the same contract as the C++ op's; with `batch_folding`, the vmap rule of
    `_register_batch_folding` for each of them and their backward ops. Returns the op's `KernelOps`."""
    names = [f"{op}_triton"] + ([op] if EXTENSION_ERROR is None else [])
    for name in names:
        torch.library.register_fake(f"stepfusion::{name}")(fake_forward)
        torch.library.register_fake(f"stepfusion::{name}_backward")(fake_backward)
        if batch_folding:
            _register_batch_folding(name)
            _register_batch_folding(f"{name}_backward")
    torch.library.register_autograd(f"stepfusion::{op}_triton",
                                    autograd_backward(getattr(torch.ops.stepfusion, f"{op}_triton_backward")),
                                    setup_context=setup_context)
    return KernelOps(op, autograd_backward, setup_context)
