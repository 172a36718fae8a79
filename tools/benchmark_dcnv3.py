"""Benchmark the DCNv3 kernels against the pure-PyTorch reference in one process.

CPU (default): the four InternImage-T stage shapes for a batch of 2 images at 224x224.
Times are medians after warm-up; peak extra memory is the growth of the peak RSS of
a fresh subprocess (Linux) that runs the op once, after one warm-up call, on inputs
it already holds.

CUDA (``--device cuda``): the stage shapes at batch 64 and the DCNv4 paper's shape
(batch 64, 56x56, 4 groups x 32 channels), float32 and float16, forward and
forward+backward, with the mask as logits and the fused softmax (``softmax=True``, the
model's path), timed with CUDA events (median after warm-up). ``--backend`` picks the
implementations timed next to the reference: the CUDA C++ kernels, the Triton kernels, or
both side by side. Before any timing, each implementation is checked against the reference
on every shape (output and three gradients in float64 on two images, and the output of the
timed dtype on the whole batch); a mismatch is reported in the table and makes the script
exit with status 1. Each forward is also compared with a device-to-device copy of the input
into an output-sized tensor measured in the same run: the fewest bytes the op must move
(input, offsets, mask, output) over its time, as a fraction of the copy's bandwidth.

    python tools/benchmark_dcnv3.py [--threads N] [--repeats R] [--json OUT]
    python tools/benchmark_dcnv3.py --dtypes [--isa auto|all|baseline|avx2|avx512] [--batch 8] [--json OUT]

``--dtypes`` times the CPU kernels in float32, bfloat16 and float16 at the stage shapes (batch
8 by default), forward and forward+backward, all of a shape round-robin, for the kernel copy
of each instruction set asked for (``all``: every copy this CPU can run), and prints each
16-bit time over the float32 time of the same copy.
    python tools/benchmark_dcnv3.py --device cuda [--backend cuda|triton|both] [--repeats R] [--json OUT]

``--block-ops`` times the fused CPU kernels of an InternImage block at inference (the DCNv3
offset/mask branch ``dw_conv_ln_gelu``, the residual sum with the next norm ``add_layer_norm_``)
against the operations they replace, at the stage shapes (batch 8 by default), round-robin.
    python tools/benchmark_dcnv3.py --block-ops [--batch 1] [--json OUT]
"""
import argparse
import json
import statistics
import time

import torch

import ops_dcnv3
from internimage.utils.benchmark import median_seconds_round_robin, peak_rss_growth

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


def cuda_inputs(size, channels, groups, batch, dtype, requires_grad, device="cuda"):
    """Stage inputs on the GPU with random mask logits (for ``softmax=True``)."""
    tensors, params = make_inputs(size, channels, groups, batch=batch)
    tensors[2] = torch.randn(tensors[2].shape, generator=torch.Generator().manual_seed(1)) * 2
    return [t.to(device, dtype).requires_grad_(requires_grad) for t in tensors], params + (True,)


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


def cuda_implementations(backend):
    """The implementations to time, by name, called directly (not through ``ops_dcnv3.dcnv3``'s
    backend choice), then the reference."""
    from ops_dcnv3.functions import _dcnv3_kernels

    impls = {}
    if backend in ("cuda", "both"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key("ops_dcnv3::dcnv3_forward", "CUDA"):
            raise SystemExit("--device cuda: ops_dcnv3 was built without CUDA kernels (rebuild with a CUDA toolkit)")
        impls["cuda"] = _dcnv3_kernels
    if backend in ("triton", "both"):
        from ops_dcnv3.triton_ops import dcnv3_triton

        impls["triton"] = dcnv3_triton
    impls["reference"] = ops_dcnv3.dcnv3_reference
    return impls


def relative_error(value, reference):
    return ((value.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2}


def check_against_reference(impl, size, channels, groups, batch, dtype, device="cuda"):
    """Worst relative error, and whether it is within tolerance, of ``impl`` against the
    reference: output and three gradients in float64 on two images, then the forward output
    in ``dtype`` on the whole batch (the reference in float32 on the same rounded inputs; the
    offset gradient is left out there because a rounded location on a pixel boundary makes
    it one-sided)."""
    tensors, params = cuda_inputs(size, channels, groups, 2, torch.float64, True, device)
    results = []
    for fn in (impl, ops_dcnv3.dcnv3_reference):
        inputs = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*inputs, *params)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device, dtype=out.dtype).view(out.shape))
        results.append([out.detach()] + [t.grad for t in inputs])
    float64_error = max(relative_error(a, b) for a, b in zip(*results))
    with torch.no_grad():
        tensors, params = cuda_inputs(size, channels, groups, batch, dtype, False, device)
        out = impl(*tensors, *params)
        ref = ops_dcnv3.dcnv3_reference(*[t.float() for t in tensors], *params)
    dtype_error = relative_error(out, ref)
    ok = float64_error <= CHECK_TOLERANCE[torch.float64] and dtype_error <= CHECK_TOLERANCE[dtype]
    return max(float64_error, dtype_error), ok


def cuda_main(args):
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    impls = cuda_implementations(args.backend)
    timed = [name for name in impls if name != "reference"]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, repeats: {args.repeats} (median, CUDA events), "
          f"softmax=True, implementations: {', '.join(timed)}")
    rows, failures = [], []
    for name, size, channels, groups, batch in CUDA_SHAPES:
        for dtype in (torch.float32, torch.float16):
            checks = {}
            for impl_name in timed:
                checks[impl_name] = check_against_reference(impls[impl_name], size, channels, groups, batch, dtype)
                if not checks[impl_name][1]:
                    failures.append(f"{impl_name} on {name} {dtype}: relative error {checks[impl_name][0]:.2e}")
            for mode in ("forward", "forward+backward"):
                row = {"shape": f"{name} b{batch}", "dtype": str(dtype).replace("torch.", ""), "mode": mode}
                for impl_name, impl in impls.items():
                    if impl_name in checks:
                        row[f"{impl_name}_max_rel_err"], row[f"{impl_name}_matches_reference"] = checks[impl_name]
                        if not checks[impl_name][1]:
                            continue  # a wrong kernel's time means nothing
                    tensors, params = cuda_inputs(size, channels, groups, batch, dtype, mode != "forward")
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    row[f"{impl_name}_ms"] = cuda_time(lambda: run_once(impl, mode, tensors, params), args.repeats)
                    row[f"{impl_name}_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                for impl_name in timed:
                    if f"{impl_name}_ms" in row:
                        row[f"{impl_name}_speedup"] = row["reference_ms"] / row[f"{impl_name}_ms"]
                if mode == "forward":
                    x = tensors[0].detach()
                    out = torch.empty_like(x)
                    row["copy_ms"] = cuda_time(lambda: out.copy_(x), args.repeats)
                    copy_gb_s = 2 * x.numel() * x.element_size() / row["copy_ms"] / 1e6
                    moved = forward_work(size, channels, groups, batch=batch)[0] // 4 * x.element_size()
                    row["copy_gb_per_s"] = copy_gb_s
                    for impl_name in timed:
                        if f"{impl_name}_ms" in row:
                            row[f"{impl_name}_gb_per_s"] = moved / row[f"{impl_name}_ms"] / 1e6
                            row[f"{impl_name}_bandwidth_fraction"] = row[f"{impl_name}_gb_per_s"] / copy_gb_s
                            row[f"{impl_name}_over_copy"] = row[f"{impl_name}_ms"] / row["copy_ms"]
                rows.append(row)
                tensors = None  # free the device memory before the next row
    print_cuda_rows(rows, timed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "softmax": True,
                       "implementations": timed, "mismatches": failures, "rows": rows}, f, indent=2)
    if failures:
        print("MISMATCH against the reference (not timed):\n  " + "\n  ".join(failures))
        raise SystemExit(1)


def print_cuda_rows(rows, timed):
    def cell(row, key, fmt, width):
        return f"{row[key]:>{width}{fmt}}" if key in row else f"{'-':>{width}}"

    header = f"{'shape':<30}{'dtype':<9}{'mode':<18}"
    header += "".join(f"{name + ' ms':>11}" for name in timed) + f"{'ref ms':>9}"
    header += "".join(f"{name + ' x':>10}" for name in timed) + f"{'copy ms':>9}"
    header += "".join(f"{name + '/copy':>13}" for name in timed) + f"{'max rel err':>12}"
    print(header)
    for r in rows:
        line = f"{r['shape']:<30}{r['dtype']:<9}{r['mode']:<18}"
        line += "".join(cell(r, f"{name}_ms", ".3f", 11) for name in timed) + cell(r, "reference_ms", ".3f", 9)
        line += "".join(cell(r, f"{name}_speedup", ".1f", 10) for name in timed) + cell(r, "copy_ms", ".3f", 9)
        line += "".join(cell(r, f"{name}_over_copy", ".2f", 13) for name in timed)
        line += f"{max(r[f'{name}_max_rel_err'] for name in timed):>12.1e}"
        print(line)
    print()
    for name in timed:
        for r in rows:
            if r["shape"].startswith("DCNv4") and r["dtype"] == "float16" and r["mode"] == "forward" \
                    and f"{name}_ms" in r:
                print(f"{name}: DCNv4 shape float16 forward: {r[f'{name}_ms']:.3f} ms = {r[f'{name}_over_copy']:.2f}x "
                      f"the copy (target <= 1.5x), {r[f'{name}_bandwidth_fraction']:.0%} of copy bandwidth")
        stages = [r[f"{name}_speedup"] for r in rows
                  if r["shape"].startswith("stage") and r["mode"] == "forward+backward" and f"{name}_speedup" in r]
        if stages:
            print(f"{name}: stage shapes forward+backward: speedup over reference min {min(stages):.1f}x "
                  "(target >= 5x)")
    if len(timed) == 2:
        ratios = [r[f"{timed[1]}_ms"] / r[f"{timed[0]}_ms"] for r in rows
                  if f"{timed[0]}_ms" in r and f"{timed[1]}_ms" in r]
        if ratios:
            print(f"{timed[1]} time / {timed[0]} time: median {statistics.median(ratios):.2f}, "
                  f"range {min(ratios):.2f} - {max(ratios):.2f}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_isa_rows(isas, batch, repeats):
    """Median ms of the CPU kernels per (shape, ISA copy, dtype, mode), each shape's steps
    timed round-robin; ISA copies are switched with ops_dcnv3.set_cpu_isa inside the steps."""
    rows = []
    previous = ops_dcnv3.set_cpu_isa("auto")
    try:
        for name, size, channels, groups in STAGES:
            tensors, params = make_inputs(size, channels, groups, batch=batch)
            tensors[2] = torch.randn(tensors[2].shape, generator=torch.Generator().manual_seed(1)) * 2  # logits
            steps = {}
            for isa in isas:
                for dtype_name, dtype in DTYPES.items():
                    inputs = [t.to(dtype) for t in tensors]
                    for mode in ("forward", "forward+backward"):
                        leaves = [t.clone().requires_grad_(mode != "forward") for t in inputs]

                        def step(isa=isa, leaves=leaves, mode=mode):
                            ops_dcnv3.set_cpu_isa(isa)
                            run_once(lambda *a: ops_dcnv3.dcnv3(*a, softmax=True), mode, leaves, params)
                        steps[(isa, dtype_name, mode)] = step
            for (isa, dtype_name, mode), seconds in median_seconds_round_robin(steps, repeats).items():
                rows.append({"shape": name, "isa": isa, "dtype": dtype_name, "mode": mode, "ms": seconds * 1e3})
    finally:
        ops_dcnv3.set_cpu_isa(previous)
    return rows


def dtypes_main(args):
    from internimage.utils.benchmark import cpu_description

    supported = ops_dcnv3.supported_cpu_isas()
    isas = supported if args.isa == "all" else [ops_dcnv3.cpu_isa() if args.isa == "auto" else args.isa]
    missing = [isa for isa in isas if isa not in supported]
    if missing:
        raise SystemExit(f"--isa {missing[0]}: this CPU runs only {', '.join(supported)}")
    print(f"CPU: {cpu_description()}, threads: {torch.get_num_threads()}, batch {args.batch}, kernel copies: "
          f"{', '.join(isas)} (default: {ops_dcnv3.cpu_isa()}), median of {args.repeats}")
    rows = dtype_isa_rows(isas, args.batch, args.repeats)
    table = {(r["shape"], r["isa"], r["dtype"], r["mode"]): r["ms"] for r in rows}
    print(f"{'shape':<22}{'isa':<10}{'mode':<18}" + "".join(f"{d + ' ms':>10}" for d in DTYPES)
          + f"{'bf16/fp32':>11}{'fp16/fp32':>11}")
    for name, *_ in STAGES:
        for isa in isas:
            for mode in ("forward", "forward+backward"):
                ms = {d: table[(name, isa, d, mode)] for d in DTYPES}
                print(f"{name:<22}{isa:<10}{mode:<18}" + "".join(f"{ms[d]:>10.2f}" for d in DTYPES)
                      + f"{ms['bf16'] / ms['fp32']:>10.2f}x{ms['fp16'] / ms['fp32']:>10.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "batch": args.batch, "rows": rows}, f, indent=2)


def block_op_rows(batch, repeats):
    """Median ms of the fused inference kernels of a block (``dw_conv_ln_gelu``,
    ``add_layer_norm_``) and of the operations they replace (the packed oneDNN depthwise
    convolution, LayerNorm and GELU; an addition and LayerNorm), at the stage shapes, each
    shape's steps timed round-robin; with the largest difference of the results."""
    import torch.nn.functional as F

    from ops_dcnv3.packed_linear import CONV_AVAILABLE, packed_conv2d

    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, size, channels, _ in STAGES:
        x = torch.randn(batch, size, size, channels, generator=gen)
        residual = torch.randn(batch, size, size, channels, generator=gen)
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        gamma, beta = torch.rand(channels, generator=gen) + 0.5, torch.rand(channels, generator=gen) - 0.5

        def unfused_branch():
            nchw = x.permute(0, 3, 1, 2)
            y = packed_conv2d(conv, nchw, torch.float32) if CONV_AVAILABLE else conv(nchw)
            return torch.ops.aten.gelu_(F.layer_norm(y.permute(0, 2, 3, 1), (channels,), gamma, beta, 1e-6))

        def unfused_sum():  # both add into a copy of x, as the block into its branch's own output
            total = x.clone().add_(residual)
            return total, F.layer_norm(total, (channels,), gamma, beta, 1e-6)

        cases = {
            "dw_conv_ln_gelu": (lambda: torch.ops.ops_dcnv3.dw_conv_ln_gelu(x, conv.weight, conv.bias, gamma, beta,
                                                                            1e-6), unfused_branch),
            "add_layer_norm_": (lambda: torch.ops.ops_dcnv3.add_layer_norm_(x.clone(), residual, None, gamma, beta,
                                                                            1e-6), lambda: unfused_sum()[1]),
        }
        with torch.no_grad():
            steps = {(op, kind): fn for op, pair in cases.items() for kind, fn in zip(("fused", "unfused"), pair)}
            times = median_seconds_round_robin(steps, repeats)
            for op, (fused, unfused) in cases.items():
                rows.append({"shape": name, "op": op, "fused_ms": times[(op, "fused")] * 1e3,
                             "unfused_ms": times[(op, "unfused")] * 1e3,
                             "max_abs_diff": (fused() - unfused()).abs().max().item()})
    return rows


def block_ops_main(args):
    from internimage.utils.benchmark import cpu_description

    print(f"CPU: {cpu_description()}, threads: {torch.get_num_threads()}, batch {args.batch}, kernel copy: "
          f"{ops_dcnv3.cpu_isa()}, median of {args.repeats}")
    rows = block_op_rows(args.batch, args.repeats)
    print(f"{'shape':<22}{'fused kernel':<18}{'fused ms':>10}{'unfused ms':>12}{'fused/unfused':>15}{'max diff':>10}")
    for r in rows:
        print(f"{r['shape']:<22}{r['op']:<18}{r['fused_ms']:>10.3f}{r['unfused_ms']:>12.3f}"
              f"{r['fused_ms'] / r['unfused_ms']:>14.2f}x{r['max_abs_diff']:>10.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "batch": args.batch, "rows": rows}, f, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", choices=["cuda", "triton", "both"], default="cuda",
                        help="with --device cuda: the C++ CUDA kernels, the Triton kernels, or both side by side")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true", help="skip the (subprocess) memory measurement")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--dtypes", action="store_true",
                        help="CPU kernels in float32 / bfloat16 / float16 per instruction-set copy (see --isa)")
    parser.add_argument("--isa", default="auto", choices=["auto", "all", "baseline", "avx2", "avx512"],
                        help="--dtypes: the kernel copies to time (all: every copy this CPU runs)")
    parser.add_argument("--block-ops", action="store_true",
                        help="CPU: the fused inference kernels of a block against the operations they replace")
    parser.add_argument("--batch", type=int, default=8, help="--dtypes, --block-ops: batch size (default 8)")
    args = parser.parse_args()
    if args.device == "cuda":
        return cuda_main(args)
    torch.set_num_threads(args.threads)
    if args.dtypes:
        return dtypes_main(args)
    if args.block_ops:
        return block_ops_main(args)
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
