"""One argument-checking helper for every op: errors name the argument, what was expected, what came."""

import torch


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def check_tensor(op, name, value, *, shape=None, rank=None, like=None, floating=True, optional=False):
    """Checks one argument. `shape` entries may be None (any size); `like` is the tensor whose dtype and
    device the argument must share. Raises ValueError for shape/rank/dtype and RuntimeError for device."""
    if value is None:
        if optional:
            return
        raise ValueError(f"{op}: {name} is required, got None")
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {_dtype_name(value.dtype)}")
    if shape is not None:
        actual = value.shape
        if None in shape:
            mismatch = len(actual) != len(shape) or any(e is not None and e != s for e, s in zip(shape, actual))
        else:  # one comparison in C, a few microseconds less per op call than the loop (these run every call)
            mismatch = actual != shape
        if mismatch:
            raise ValueError(f"{op}: {name} must have shape {format_shape(shape)}, got {format_shape(actual)}")
    elif rank is not None and value.dim() != rank:
        raise ValueError(f"{op}: {name} must have rank {rank}, got shape {format_shape(value.shape)}")
    if like is not None:
        if floating and value.dtype != like.dtype:
            raise ValueError(
                f"{op}: {name} must have the same dtype as the first input "
                f"({_dtype_name(like.dtype)}), got {_dtype_name(value.dtype)}"
            )
        if value.device != like.device:
            raise RuntimeError(f"{op}: {name} must be on {like.device} like the first input, got {value.device}")


def format_shape(shape):
    """"(2, any, 8)", like a tuple's repr. Each size goes through an f-string, not str() or repr(): under
    torch.compile with dynamic shapes the sizes are SymInts, and Dynamo formats those only that way."""
    return "(" + ", ".join("any" if s is None else f"{s}" for s in shape) + ("," if len(shape) == 1 else "") + ")"
