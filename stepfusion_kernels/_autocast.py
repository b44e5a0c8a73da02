"""The ops inside torch.autocast: the dtype their floating inputs take there, chosen as for PyTorch's own ops."""

import contextlib
import functools

import torch

# The device types whose autocast the ops follow: their backends' devices ("meta" and others have no
# autocast state to ask about).
_DEVICE_TYPES = ("cpu", "cuda")


def _autocast_on(first):
    # The first test is the cheap one (0.1 us, against about 1 us for the rest), made on every op call.
    return (torch._C._is_any_autocast_enabled() and isinstance(first, torch.Tensor)
            and first.device.type in _DEVICE_TYPES and torch.is_autocast_enabled(first.device.type))


def autocast_inputs(policy, args):
    """`args` with their floating tensors cast by `policy` when autocast is on for the first one's device
    type; otherwise `args` as they are (the op then requires a single dtype). The policies follow the
    PyTorch ops an op is made of:
      "lower"    GEMM-like (linear, matmul, attention): autocast's dtype, float16 or bfloat16
      "float32"  losses (log_softmax, kl_div, mse_loss): float32
      "promote"  the widest of the inputs' dtypes (elementwise work and a LayerNorm, float32 inside anyway)
    As autocast does, nothing is cast when an input is float64. The casts are differentiable: each input's
    gradient comes back in its own dtype."""
    if not _autocast_on(args[0]):
        return args
    dtypes = [arg.dtype for arg in args if isinstance(arg, torch.Tensor) and arg.is_floating_point()]
    if torch.float64 in dtypes:
        return args
    if policy == "lower":
        dtype = torch.get_autocast_dtype(args[0].device.type)
    elif policy == "float32":
        dtype = torch.float32
    else:
        dtype = functools.reduce(torch.promote_types, dtypes)
    return tuple(arg.to(dtype) if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg
                 for arg in args)


def reference_context(first):
    """Autocast off around the reference, which would otherwise run its float32 matmuls in autocast's dtype:
    it computes as the spec says, as the kernels do."""
    return torch.autocast(first.device.type, enabled=False) if _autocast_on(first) else contextlib.nullcontext()
