"""Build ops_dcnv3 with its CUDA kernels on a machine without a GPU, exactly as a GPU user's
``pip install -e .`` would (setup.py's own extension: its sources, flags, and the C++ standard
that torch's BuildExtension picks), into a temporary folder, so that a broken kernel is caught
where the toolkit is present but no GPU is (CI). The installed extension is left alone.

    python tools/check_cuda_build.py [--arch 90] [--out DIR]

The architecture defaults to the first of TORCH_CUDA_ARCH_LIST, else 9.0.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_arch = (os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").replace(";", " ").split() or ["9.0"])[0]
    parser.add_argument("--arch", default=default_arch.replace(".", "").replace("+PTX", ""))
    parser.add_argument("--out", help="folder for the build (default: a temporary one)")
    args = parser.parse_args()
    out_dir = args.out or tempfile.mkdtemp(prefix="dcnv3-cuda-")
    arch = f"{args.arch[:-1]}.{args.arch[-1]}"  # "90" -> "9.0", as TORCH_CUDA_ARCH_LIST spells it
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch)
    if "CUDA_HOME" not in env and "CUDA_PATH" not in env:
        # torch takes CUDA_HOME from nvcc's folder; an nvcc installed outside the toolkit
        # (e.g. /usr/local/bin) leaves it without the runtime library to link against.
        nvcc = shutil.which("nvcc")
        homes = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
        for home in homes:
            has_runtime = glob.glob(os.path.join(home, "lib*", "libcudart.so*"))
            if has_runtime and os.path.isfile(os.path.join(home, "bin", "nvcc")):
                env["CUDA_HOME"] = home
                break
    command = [sys.executable, "setup.py", "build_ext", "--build-temp", os.path.join(out_dir, "temp"),
               "--build-lib", os.path.join(out_dir, "lib")]
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-6000:] + result.stderr[-6000:])
        sys.exit(f"building ops_dcnv3 with CUDA failed (sm_{args.arch}); command: {' '.join(command)}")
    built = glob.glob(os.path.join(out_dir, "lib", "ops_dcnv3", "_C*.so"))
    objects = glob.glob(os.path.join(out_dir, "temp", "**", "dcnv3_cuda.o"), recursive=True)
    if not built or not objects:
        sys.exit(f"the build ran but left no CUDA object or extension in {out_dir}")
    print(f"compiled ops_dcnv3/csrc/cuda/dcnv3_cuda.cu for sm_{args.arch} and linked {os.path.basename(built[0])} "
          f"with setup.py's flags in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
