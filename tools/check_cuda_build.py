"""Compile the CUDA sources of ops_dcnv3 with nvcc, without a GPU, as setup.py's
CUDAExtension would (same include paths and flags), so that a broken kernel is caught on
machines that have the toolkit but no GPU (CI).

    python tools/check_cuda_build.py [--arch 90] [--out DIR]

The architecture defaults to the first of TORCH_CUDA_ARCH_LIST, else 9.0.
"""
import argparse
import glob
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvcc_path():
    home = cpp_extension.CUDA_HOME
    candidate = os.path.join(home, "bin", "nvcc") if home else None
    if candidate and os.path.exists(candidate):
        return candidate
    raise FileNotFoundError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")


def nvidia_wheel_include_dirs():
    """Headers of the CUDA libraries that torch's wheels install (cusparse.h, cublas_v2.h...),
    for toolkits that ship only the compiler and runtime."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "include")))


def compile_flags(arch: str):
    includes = (cpp_extension.include_paths(device_type="cuda") + nvidia_wheel_include_dirs() +
                [sysconfig.get_paths()["include"]])
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ([f"-I{path}" for path in includes] + cpp_extension.COMMON_NVCC_FLAGS +
            ["-std=c++20", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DWITH_CUDA",
             f"-gencode=arch=compute_{arch},code=sm_{arch}"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_arch = (os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").replace(";", " ").split() or ["9.0"])[0]
    parser.add_argument("--arch", default=default_arch.replace(".", "").replace("+PTX", ""))
    parser.add_argument("--out", help="directory for the object files (default: a temporary one)")
    args = parser.parse_args()
    out_dir = args.out or tempfile.mkdtemp(prefix="dcnv3-cuda-")
    sources = sorted(glob.glob(os.path.join(ROOT, "ops_dcnv3", "csrc", "cuda", "*.cu")))
    if not sources:
        sys.exit("no CUDA sources found")
    for source in sources:
        start = time.time()
        target = os.path.join(out_dir, os.path.basename(source) + ".o")
        command = [nvcc_path(), "-c", source, "-o", target] + compile_flags(args.arch)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout[-5000:] + result.stderr[-5000:])
            sys.exit(f"nvcc failed on {source} (sm_{args.arch})")
        print(f"compiled {os.path.relpath(source, ROOT)} for sm_{args.arch} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
