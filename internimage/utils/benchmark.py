"""What the benchmark scripts share: round-robin timing, the CPU description, and the peak
memory of one step, measured in a fresh process.

The step is built by a factory function of a script or module file, so the measured
process holds only what that step needs (no other model, no earlier peak).
"""
import os
import statistics
import subprocess
import sys
import time

_PROBE = """
import importlib.util
import torch

spec = importlib.util.spec_from_file_location("_benchmark_script", {path!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
torch.set_num_threads({threads})
step = getattr(module, {factory!r})(**{kwargs!r})


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


step()  # warm-up: one-time set-up (autograd engine, oneDNN primitives...)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmRSS:")
step()
print(status("VmHWM:") - base)
"""


def peak_rss_growth(path: str, factory: str, kwargs: dict, threads: int) -> int:
    """Peak RSS growth in bytes of the second call of ``factory(**kwargs)()`` (``factory``: a
    function of the Python file ``path`` that returns the step) in a fresh interpreter (Linux).

    Allocations of 64 KiB and more are mmap-ed fresh (``MALLOC_MMAP_THRESHOLD_``), so memory
    that the imports freed cannot hide the step's own peak.
    """
    code = _PROBE.format(path=os.path.abspath(path), factory=factory, kwargs=kwargs, threads=threads)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_description() -> str:
    """The CPU's model name and the vector/matrix ISA extensions that matter to the kernels
    (from ``/proc/cpuinfo`` on Linux; the platform string elsewhere)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return f"{fields.get('model name', platform.machine())} [{' '.join(f for f in ISA_FLAGS if f in flags)}]"


def median_seconds_round_robin(steps, repeats, warmup=2):
    """Median seconds of each step after ``warmup`` calls, timed round-robin (one call of
    each step in turn, ``repeats`` rounds) so that a slow phase of the machine hits all of them."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
