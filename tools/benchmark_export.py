"""CPU inference speed of the exported ONNX graph against this project's eager PyTorch path.

    python tools/benchmark_export.py [--variant t] [--shape 224] [--batches 1 8] [--threads 2]
                                     [--repeats 10] [--no-reference] [--json OUT]

Runtimes, in one process with the same thread count, timed in turn (round-robin) so that
load from elsewhere on the machine affects them alike; medians after warm-up:

* ``pytorch``: eager PyTorch, the compiled DCNv3 CPU kernel (``ops_dcnv3.dcnv3``);
* ``pytorch-reference``: eager PyTorch with the pure-PyTorch DCNv3 core (``grid_sample``,
  the formulation the portable ONNX graph also uses);
* ``onnxruntime``: the ONNX file of ``tools/export.py`` (DCNv3 in standard operators),
  CPU provider, ``intra_op_num_threads=threads``;
* ``openvino``: the same file, when OpenVINO is installed (``pip install openvino``),
  f32 inference, compiled per batch size.

Weights are random (with random DCNv3 offsets, so sampling is not at pixel centres); speed
does not depend on them. Ratios are time / time of ``pytorch``: above 1 is slower.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from internimage import build_model  # noqa: E402
from internimage.deploy import capture, export_onnx, random_inputs  # noqa: E402
from internimage.deploy.models import randomize_sampling  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_runner(model):
    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return run


def onnxruntime_runner(path, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_runner(path, threads, batch, size):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path)
    model.reshape([batch, 3, *size])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                                 "PERFORMANCE_HINT": "LATENCY"})
    return lambda x: compiled(x)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="t")
    parser.add_argument("--shape", type=int, nargs="+", default=[224], metavar="H [W]")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-reference", action="store_true", help="skip the pure-PyTorch DCNv3 core")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    size = (args.shape[0], args.shape[-1])
    torch.set_num_threads(args.threads)

    model = randomize_sampling(build_model(args.variant, drop_path_rate=0.0)).eval()
    runtimes = {"pytorch": {b: torch_runner(model) for b in args.batches}}
    if not args.no_reference:
        reference = build_model(args.variant, drop_path_rate=0.0, core_op="DCNv3_pytorch").eval()
        reference.load_state_dict(model.state_dict())
        runtimes["pytorch-reference"] = {b: torch_runner(reference) for b in args.batches}
    tmp = tempfile.TemporaryDirectory(prefix="internimage-bench-")
    path = os.path.join(tmp.name, f"{args.variant}.onnx")
    program = capture(model, random_inputs(size, [2])["random b2"], dynamic_batch=True)
    export_onnx(program, path, ["logits"])
    runtimes["onnxruntime"] = {b: onnxruntime_runner(path, args.threads) for b in args.batches}
    try:
        import openvino  # noqa: F401

        runtimes["openvino"] = {b: openvino_runner(path, args.threads, b, size) for b in args.batches}
    except ImportError:
        print("OpenVINO not installed: skipped (pip install openvino)")

    inputs = {b: np.random.default_rng(b).standard_normal((b, 3, *size)).astype(np.float32) for b in args.batches}
    results = {name: {} for name in runtimes}
    for batch in args.batches:
        x = inputs[batch]
        expected = runtimes["pytorch"][batch](x)
        for name, runners in runtimes.items():
            for _ in range(2):  # warm-up: allocations, oneDNN primitives, ORT/OpenVINO arenas
                out = runners[batch](x)
            results[name][batch] = dict(times=[], rel_err=float(np.abs(out - expected).max() / np.abs(expected).max()))
        for _ in range(args.repeats):
            for name, runners in runtimes.items():
                start = time.perf_counter()
                runners[batch](x)
                results[name][batch]["times"].append(time.perf_counter() - start)

    print(f"\nInternImage-{args.variant.upper()} classifier, {size[0]}x{size[1]}, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible); torch {torch.__version__}")
    header = "| runtime | " + " | ".join(f"batch {b} ms | vs pytorch" for b in args.batches) + " | max rel diff |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    summary = {}
    for name in runtimes:
        cells, summary[name] = [], {}
        for batch in args.batches:
            median = statistics.median(results[name][batch]["times"]) * 1e3
            base = statistics.median(results["pytorch"][batch]["times"]) * 1e3
            cells.append(f"{median:.1f} | {median / base:.2f}x")
            summary[name][batch] = dict(ms=median, ratio=median / base, rel_err=results[name][batch]["rel_err"])
        worst = max(r["rel_err"] for r in summary[name].values())
        print(f"| {name} | " + " | ".join(cells) + f" | {worst:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=cpu_model(), threads=args.threads, size=size, results=summary), f, indent=2)
    tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
