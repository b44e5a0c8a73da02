"""Registration shared by every op: fake (meta) kernels and autograd for its C++ and Triton op pairs."""

import torch

from .._backend import EXTENSION_ERROR


def register_kernel_ops(op, fake_forward, fake_backward, autograd_backward, setup_context):
    """Registers `fake_forward`/`fake_backward` and autograd (`autograd_backward(backward_op)` builds the
    backward function) for stepfusion::<op>_triton and, where the extension is built, stepfusion::<op>."""
    names = [f"{op}_triton"] + ([op] if EXTENSION_ERROR is None else [])
    for name in names:
        torch.library.register_fake(f"stepfusion::{name}")(fake_forward)
        torch.library.register_fake(f"stepfusion::{name}_backward")(fake_backward)
        backward_op = getattr(torch.ops.stepfusion, f"{name}_backward")
        torch.library.register_autograd(f"stepfusion::{name}", autograd_backward(backward_op),
                                        setup_context=setup_context)
