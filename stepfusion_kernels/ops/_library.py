"""Registration shared by every op: fake (meta) kernels for its C++ and Triton op pairs, and autograd for
the Triton pair (the C++ ops' autograd is registered in C++, csrc/autograd.cpp, where it costs a few
microseconds per call instead of about a hundred)."""

import torch

from .._backend import EXTENSION_ERROR


def register_kernel_ops(op, fake_forward, fake_backward, autograd_backward, setup_context):
    """Registers `fake_forward`/`fake_backward` for stepfusion::<op>_triton and, where the extension is built,
    stepfusion::<op>; and autograd (`autograd_backward(backward_op)` builds the backward function) for
    stepfusion::<op>_triton, with the same contract as the C++ op's."""
    names = [f"{op}_triton"] + ([op] if EXTENSION_ERROR is None else [])
    for name in names:
        torch.library.register_fake(f"stepfusion::{name}")(fake_forward)
        torch.library.register_fake(f"stepfusion::{name}_backward")(fake_backward)
    torch.library.register_autograd(f"stepfusion::{op}_triton",
                                    autograd_backward(getattr(torch.ops.stepfusion, f"{op}_triton_backward")),
                                    setup_context=setup_context)
