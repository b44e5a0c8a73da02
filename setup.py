"""Build stepfusion_kernels._C: C++ CPU kernels always, CUDA kernels whenever they can be compiled.

Switches (environment variables):
    STEPFUSION_CUDA=0|1     force the CUDA sources off / on (default: on when torch is a CUDA
                            build and nvcc is found; no GPU is needed to compile and link them)
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0": Ampere and Hopper)
    MAX_JOBS                parallel compile jobs (read by torch's ninja build)
    STEPFUSION_CPU_FLAGS    compiler flags selecting the CPU kernels' vector ISA (default: AVX2 + FMA on
                            x86-64 machines that have them, as at::vec needs them at compile time; "" for
                            a portable build of scalar-width vectors)
    CUDA_HOME               the CUDA toolkit root; found from `nvcc` on PATH when unset
"""

import glob
import os
import platform
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _toolkit_root_from_nvcc():
    """The CUDA toolkit root behind the `nvcc` on PATH, following a wrapper script if it is one."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(nvcc))
    if os.path.isdir(os.path.join(root, "lib64")) or os.path.isdir(os.path.join(root, "targets")):
        return root
    # A small wrapper script (`exec /usr/local/cuda-X/bin/nvcc "$@"`): the real one is named inside.
    try:
        with open(nvcc, "r", errors="ignore") as handle:
            text = handle.read(4096)
    except OSError:
        return None
    match = re.search(r"(/\S+)/bin/nvcc\b", text)
    return match.group(1) if match else None


def _configure_cuda_home():
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    root = _toolkit_root_from_nvcc()
    if root is not None:
        os.environ["CUDA_HOME"] = root


def _pip_cuda_include_dirs():
    """cuBLAS/cuSPARSE headers shipped by pip's nvidia packages, for toolkits that lack them."""
    dirs = []
    for site in sys.path:
        for pattern in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/cublas/include",
                        "nvidia/cusparse/include"):
            dirs.extend(sorted(glob.glob(os.path.join(site, pattern))))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _cublaslt_library():
    """The cuBLASLt shared library to link (skew_pair_project's grouped GEMM): the toolkit's, else the one
    pip's nvidia packages ship for torch (versioned name only, so it is linked by path)."""
    dirs = [os.path.join(CUDA_HOME, sub) for sub in ("lib64", "lib", "targets/x86_64-linux/lib")]
    dirs += [os.path.join(os.path.dirname(d), "lib") for d in _pip_cuda_include_dirs()]
    for directory in dirs:
        found = sorted(glob.glob(os.path.join(directory, "libcublasLt.so*")), key=len)
        if found:
            return found[0]
    raise RuntimeError(f"cuBLASLt (libcublasLt.so*) not found in {dirs}; set STEPFUSION_CUDA=0 for a CPU-only build")


def _cpu_flags():
    """Flags for at::vec: it picks its implementation from CPU_CAPABILITY_* macros at compile time."""
    custom = os.environ.get("STEPFUSION_CPU_FLAGS")
    if custom is not None:
        return custom.split()
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as handle:
            flags = set(re.findall(r"\w+", next((line for line in handle if line.startswith("flags")), "")))
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


_configure_cuda_home()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

import torch  # noqa: E402  (CUDA_HOME must be set before torch's extension helpers read it)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    switch = os.environ.get("STEPFUSION_CUDA")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if switch == "0":
        return False
    if switch == "1":
        if not possible:
            raise RuntimeError(
                "STEPFUSION_CUDA=1 but the CUDA sources cannot be built: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
            )
        return True
    return possible


def _extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"] + _cpu_flags()
    if not _want_cuda():
        return CppExtension(
            "stepfusion_kernels._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
                py_limited_api=True,
        )
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    include_dirs = []
    if not os.path.exists(os.path.join(CUDA_HOME, "include", "cublas_v2.h")):
        include_dirs = _pip_cuda_include_dirs()
    return CUDAExtension(
        "stepfusion_kernels._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": cxx_flags + ["-DSTEPFUSION_WITH_CUDA"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DSTEPFUSION_WITH_CUDA"],
        },
        extra_link_args=["-fopenmp", _cublaslt_library()],
        py_limited_api=True,
    )


setup(
    name="stepfusion-kernels",
    version="0.1.0",
    description="Triton and C++/CUDA kernels for multimodal fusion (Step fusion, SSFN, Meta Fusion)",
    packages=find_packages(include=["stepfusion_kernels", "stepfusion_kernels.*", "python_ref", "python_ref.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "triton": ["triton>=3.3"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.3", "scikit-learn"],
        "ssfn": ["scikit-learn"],           # the ssfn-digits task's 8x8 digits (load_digits, bundled)
        "hf": ["transformers"],             # models.HuggingFaceLayerStack on Hugging Face encoders
    },
    entry_points={"console_scripts": ["stepfusion-bench=stepfusion_kernels.bench:main",
                                     "stepfusion-train=stepfusion_kernels.train:main"]},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
