"""Build and install InternImage and its DCNv3 operator (``ops_dcnv3._C``).

The extension is built with ``CUDAExtension`` when a CUDA toolkit is usable and
either a GPU is visible or ``FORCE_CUDA=1`` is set, and with ``CppExtension``
otherwise, so it never fails on a CPU-only machine.
Install with ``pip install --no-build-isolation -e .`` (torch must already be
installed: the extension is compiled against it).
"""
import glob
import os
import re
import sysconfig

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("ops_dcnv3", "csrc")


def read_version():
    with open(os.path.join(ROOT, "internimage", "version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def want_cuda():
    import torch

    if os.environ.get("FORCE_CUDA", "0") == "1":
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    return CUDA_HOME is not None and torch.cuda.is_available() and torch.version.cuda is not None


def make_extension():
    sources = [os.path.join(CSRC, "dcnv3.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    # at::parallel_for is header-inlined OpenMP in torch's CPU build; -fopenmp links the
    # same libgomp.so.1 that torch loads, so torch.set_num_threads governs our kernels too.
    # -fno-trapping-math: nothing here reads floating-point exception flags, and without it GCC
    # does not vectorise loops with float comparisons, floor or float->int conversions
    # (the per-point loops of the CPU kernels). It changes no result.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    define_macros = []
    debug = os.environ.get("DCNV3_DEBUG", "0") == "1"
    if debug:
        cxx_flags = ["-O1", "-g", "-fopenmp", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    if want_cuda():
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        # Headers of the CUDA libraries installed with torch's wheels, for toolkits
        # that ship only the compiler and runtime.
        wheel_includes = sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "include")))
        # No --use_fast_math: its approximate exp and division moved float32 softmax weights by
        # ~1e-6 relative from the CPU kernels (its flush of denormals too), and the host
        # harness (tests/test_dcnv3_cuda_host.py) checks the kernels' code as IEEE arithmetic.
        # The kernels are bound by memory reads (4 corners per point), not by the exps.
        return CUDAExtension(
            "ops_dcnv3._C",
            sources,
            include_dirs=wheel_includes,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "ops_dcnv3._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] + (["-fsanitize=address,undefined"] if debug else []),
    )


setup(
    name="internimage",
    version=read_version(),
    description="InternImage backbones and the DCNv3 operator for OpenMMLab 2.0 (mmdet 3.x, mmseg 1.x)",
    packages=find_packages(include=["internimage*", "ops_dcnv3*"]),
    package_data={"ops_dcnv3": ["csrc/*.cpp", "csrc/*/*.cpp", "csrc/*/*.cu", "csrc/*/*.cuh", "csrc/*/*.h"],
                  "internimage": ["checkpoint/*.txt"]},
    python_requires=">=3.9",
    # Optional: export to ONNX checked in onnxruntime (tools/export.py), OpenVINO for its benchmark.
    extras_require={
        "deploy": ["onnx>=1.23", "onnxruntime>=1.31", "onnxscript>=0.7"],
        "openvino": ["openvino>=2026.4"],
        "deepspeed": ["deepspeed>=0.19,<0.20"],  # tools/train.py --strategy deepspeed-zero1|deepspeed-zero3
    },
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
