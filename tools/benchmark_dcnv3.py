"""Benchmark the DCNv3 kernels against the pure-PyTorch reference in one process.

CPU (default): the four InternImage-T stage shapes for a batch of 2 images at 224x224.
Times are medians after warm-up; peak extra memory is the growth of the peak RSS of
a fresh subprocess (Linux) that runs the op once, after one warm-up call, on inputs
it already holds.

CUDA (``--device cuda``): the stage shapes at batch 64 and the DCNv4 paper's shape
(batch 64, 56x56, 4 groups x 32 channels), float32 and float16, forward and
forward+backward, timed with CUDA events (median after warm-up). Each forward is also
compared with a device-to-device copy of the input into an output-sized tensor measured
in the same run: the fewest bytes the op must move (input, offsets, mask, output) over its
time, as a fraction of the copy's bandwidth.

    python tools/benchmark_dcnv3.py [--threads N] [--repeats R] [--json OUT]
    python tools/benchmark_dcnv3.py --device cuda [--repeats R] [--json OUT]
"""
import argparse
import json
import statistics
import time

import torch

import ops_dcnv3
from internimage.utils.benchmark import peak_rss_growth

STAGES = [  # (name, H=W, channels, groups)
    ("stage1 56x56x64 G4", 56, 64, 4),
    ("stage2 28x28x128 G8", 28, 128, 8),
    ("stage3 14x14x256 G16", 14, 256, 16),
    ("stage4 7x7x512 G32", 7, 512, 32),
]
IMPLS = {"ours": ops_dcnv3.dcnv3, "reference": ops_dcnv3.dcnv3_reference}
KERNEL = (3, 3, 1, 1, 1, 1, 1, 1)  # kernel, stride, pad, dilation (h, w each)


def make_inputs(size, channels, groups, batch=2, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, size, size, channels, generator=gen)
    offset = torch.randn(batch, size, size, groups * 18, generator=gen) * 2
    mask = torch.randn(batch, size, size, groups, 9, generator=gen).softmax(-1).reshape(batch, size, size, -1)
    tensors = [t.requires_grad_(requires_grad) for t in (x, offset, mask)]
    params = KERNEL + (groups, channels // groups, 1.0, False)
    return tensors, params


def run_once(impl, mode, tensors, params):
    if mode == "forward":
        with torch.no_grad():
            return impl(*tensors, *params)
    out = impl(*tensors, *params)
    out.backward(torch.ones_like(out))
    for t in tensors:
        t.grad = None
    return out


def time_op(impl, mode, size, channels, groups, repeats):
    tensors, params = make_inputs(size, channels, groups, requires_grad=mode != "forward")
    for _ in range(3):
        run_once(impl, mode, tensors, params)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_once(impl, mode, tensors, params)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_step(size, channels, groups, impl, mode):
    """One call of ``impl`` on inputs it already holds (built in a fresh process)."""
    tensors, params = make_inputs(size, channels, groups, requires_grad=mode != "forward")
    return lambda: run_once(IMPLS[impl], mode, tensors, params)


def peak_extra_memory(impl_name, mode, size, channels, groups, threads):
    """Peak RSS growth (bytes) of one call in a fresh interpreter (Linux)."""
    return peak_rss_growth(__file__, "memory_step", dict(size=size, channels=channels, groups=groups,
                                                         impl=impl_name, mode=mode), threads)


def forward_work(size, channels, groups, batch=2):
    """Fewest bytes the forward must move (float32) and its multiply-adds."""
    pixels = batch * size * size
    points = 9
    bytes_moved = 4 * pixels * (2 * channels + groups * points * 3)  # input, output, offset, mask
    macs = pixels * points * channels * 4  # four bilinear corners per point and channel
    return bytes_moved, macs


CUDA_SHAPES = [(name, size, channels, groups, 64) for name, size, channels, groups in STAGES] + [
    ("DCNv4 shape 56x56 4x32", 56, 128, 4, 64)]


def cuda_inputs(size, channels, groups, batch, dtype, requires_grad):
    tensors, params = make_inputs(size, channels, groups, batch=batch)
    return [t.to("cuda", dtype).requires_grad_(requires_grad) for t in tensors], params


def cuda_time(fn, repeats, warmup=5):
    """Median milliseconds of ``fn`` on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_main(args):
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("ops_dcnv3::dcnv3_forward", "CUDA"):
        raise SystemExit("--device cuda: ops_dcnv3 was built without CUDA kernels (rebuild with a CUDA toolkit)")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, repeats: {args.repeats} (median, CUDA events)")
    rows = []
    for name, size, channels, groups, batch in CUDA_SHAPES:
        for dtype in (torch.float32, torch.float16):
            for mode in ("forward", "forward+backward"):
                row = {"shape": f"{name} b{batch}", "dtype": str(dtype).replace("torch.", ""), "mode": mode}
                for impl_name, impl in IMPLS.items():
                    tensors, params = cuda_inputs(size, channels, groups, batch, dtype, mode != "forward")
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    row[f"{impl_name}_ms"] = cuda_time(lambda: run_once(impl, mode, tensors, params), args.repeats)
                    row[f"{impl_name}_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                row["speedup"] = row["reference_ms"] / row["ours_ms"]
                if mode == "forward":
                    x = tensors[0].detach()
                    out = torch.empty_like(x)
                    row["copy_ms"] = cuda_time(lambda: out.copy_(x), args.repeats)
                    copy_gb_s = 2 * x.numel() * x.element_size() / row["copy_ms"] / 1e6
                    moved = forward_work(size, channels, groups, batch=batch)[0] // 4 * x.element_size()
                    row["ours_gb_per_s"] = moved / row["ours_ms"] / 1e6
                    row["copy_gb_per_s"] = copy_gb_s
                    row["bandwidth_fraction"] = row["ours_gb_per_s"] / copy_gb_s
                    row["ours_over_copy"] = row["ours_ms"] / row["copy_ms"]
                rows.append(row)
                tensors = None  # free the device memory before the next row
    print(f"{'shape':<30}{'dtype':<9}{'mode':<18}{'ours ms':>9}{'ref ms':>9}{'speedup':>9}"
          f"{'copy ms':>9}{'ours/copy':>10}{'GB/s':>8}{'of copy':>8}")
    for r in rows:
        line = (f"{r['shape']:<30}{r['dtype']:<9}{r['mode']:<18}{r['ours_ms']:>9.3f}{r['reference_ms']:>9.3f}"
                f"{r['speedup']:>8.1f}x")
        if "copy_ms" in r:
            line += (f"{r['copy_ms']:>9.3f}{r['ours_over_copy']:>9.2f}x{r['ours_gb_per_s']:>8.0f}"
                     f"{r['bandwidth_fraction']:>8.0%}")
        print(line)
    print()
    target = [r for r in rows if r["shape"].startswith("DCNv4") and r["dtype"] == "float16" and r["mode"] == "forward"]
    for r in target:
        print(f"DCNv4 shape float16 forward: {r['ours_ms']:.3f} ms = {r['ours_over_copy']:.2f}x the copy "
              f"(target <= 1.5x), {r['bandwidth_fraction']:.0%} of copy bandwidth")
    stages = [r for r in rows if r["shape"].startswith("stage") and r["mode"] == "forward+backward"]
    if stages:
        print(f"stage shapes forward+backward: speedup over reference min {min(r['speedup'] for r in stages):.1f}x "
              "(target >= 5x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true", help="skip the (subprocess) memory measurement")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.device == "cuda":
        return cuda_main(args)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, repeats: {args.repeats} (median)")

    rows = []
    for name, size, channels, groups in STAGES:
        for mode in ("forward", "forward+backward"):
            row = {"shape": name, "mode": mode}
            for impl_name, impl in IMPLS.items():
                row[f"{impl_name}_ms"] = time_op(impl, mode, size, channels, groups, args.repeats) * 1e3
                if not args.no_memory:
                    row[f"{impl_name}_mem_mb"] = peak_extra_memory(impl_name, mode, size, channels, groups,
                                                                   args.threads) / 2**20
            row["speedup"] = row["reference_ms"] / row["ours_ms"]
            if not args.no_memory:
                row["memory_ratio"] = row["ours_mem_mb"] / max(row["reference_mem_mb"], 1e-9)
            if mode == "forward":
                bytes_moved, macs = forward_work(size, channels, groups)
                row["ours_gb_per_s"] = bytes_moved / row["ours_ms"] / 1e6
                row["ours_gmac_per_s"] = macs / row["ours_ms"] / 1e6
            rows.append(row)

    header = f"{'shape':<22}{'mode':<18}{'ours ms':>9}{'ref ms':>9}{'speedup':>9}"
    if not args.no_memory:
        header += f"{'ours MB':>9}{'ref MB':>9}{'mem ratio':>10}"
    print(header)
    for r in rows:
        line = f"{r['shape']:<22}{r['mode']:<18}{r['ours_ms']:>9.3f}{r['reference_ms']:>9.3f}{r['speedup']:>8.1f}x"
        if not args.no_memory:
            line += f"{r['ours_mem_mb']:>9.1f}{r['reference_mem_mb']:>9.1f}{r['memory_ratio']:>10.2f}"
        print(line)
    print()
    for r in rows:
        extra = ""
        if "ours_gb_per_s" in r:
            extra = f"  (ours: {r['ours_gb_per_s']:.1f} GB/s of compulsory traffic, {r['ours_gmac_per_s']:.1f} GMAC/s)"
        mem = "" if args.no_memory else f", memory {r['memory_ratio']:.2f}x of reference"
        print(f"{r['shape']} {r['mode']}: {r['speedup']:.1f}x faster than reference{mem}{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
