"""Which backends exist on this machine, and which one a call uses."""

import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

try:
    from . import _C  # noqa: F401  (importing it registers the C++/CUDA kernels with the dispatcher)

    EXTENSION_ERROR = None
except ImportError as error:  # the package still works through the reference and Triton backends
    EXTENSION_ERROR = error
    warnings.warn(
        f"stepfusion_kernels._C could not be imported ({error}); the 'cpu' and 'cuda' backends are "
        "unavailable. Build it with `pip install --no-build-isolation -e .`.",
        stacklevel=2,
    )


def triton_interpreted():
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _has_kernel(op, dispatch_key):
    return EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


def extension_has_cuda():
    """True when the extension was compiled with its CUDA kernels (whether or not a GPU is present)."""
    return _has_kernel("stepfusion::shift_expand", "CUDA")


def _usable_backends():
    usable = ["reference"]
    if _has_kernel("stepfusion::shift_expand", "CPU"):
        usable.append("cpu")
    if extension_has_cuda() and torch.cuda.is_available():
        usable.append("cuda")
    if importlib.util.find_spec("triton") is not None and (torch.cuda.is_available() or triton_interpreted()):
        usable.append("triton")
    return tuple(usable)


# Fixed for the life of the process; a constant also keeps backend choice free of graph breaks
# under torch.compile.
_USABLE = _usable_backends()


def backends():
    """The backends usable on this machine: "reference" always, "cpu" where the extension is built,
    "cuda" where it was built with CUDA and a GPU is present, "triton" on a GPU (or on CPU tensors
    with TRITON_INTERPRET=1)."""
    return list(_USABLE)


def resolve_backend(op, backend, device, dtype, gpu_order=("cuda", "triton")):
    """The concrete backend for tensors of `dtype` on `device`: `auto` becomes the first usable backend that
    takes that dtype, of `cpu` on the CPU and of `gpu_order` (the op's faster GPU backend first, by the
    benchmarks) on CUDA, else `reference` (float16 on the CPU, float64 on CUDA, other devices); an explicit
    choice is checked (its dtype by check_backend_dtype)."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    usable = _USABLE
    if backend == "auto":
        candidates = ("cpu",) if device.type == "cpu" else gpu_order if device.type == "cuda" else ()
        return next((name for name in candidates if name in usable and dtype in BACKEND_DTYPES[name]), "reference")
    if backend not in usable:
        raise RuntimeError(f"{op}: backend {backend!r} is not available on this machine (available: {usable})")
    if backend == "cpu" and device.type != "cpu":
        raise RuntimeError(f"{op}: backend 'cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise RuntimeError(f"{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        raise RuntimeError(
            f"{op}: backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
        )
    return backend


BACKEND_DTYPES = {
    "reference": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


def check_backend_dtype(op, backend, dtype):
    if dtype not in BACKEND_DTYPES[backend]:
        names = ", ".join(str(d).replace("torch.", "") for d in BACKEND_DTYPES[backend])
        raise ValueError(f"{op}: backend {backend!r} supports {names}; got {str(dtype).replace('torch.', '')}")
