"""Train InternImage-T as a classifier on the GPU for a few iterations and compare its gradients
with the CPU's: the GPU acceptance check of the whole model (tools/gpu_acceptance.sh runs it).

For each DCNv3 backend asked for (``--backends cuda triton``):

1. Gradients: from the same initial weights and one batch, the GPU's float32 gradients
   (TF32 off) against the CPU's, in eval mode (the head's BatchNorm then uses its running
   statistics: over a batch of two its batch statistics leave gradients that are rounding
   noise). Per parameter tensor, ``|g_gpu - g_cpu| / |g_cpu|`` (Euclidean norms) must stay
   below ``--grad-tol``, default 1e-4. Why that bound: both sides compute in float32 and
   differ only in summation order (cuDNN / cuBLAS / atomics against the CPU's loops); on
   the CPU, the float32 gradients of this check differ from float64 ones by at most 1.6e-6
   per tensor (measured at 64x64), which bounds each side's rounding error, so CPU and GPU
   should agree to a few 1e-6, 1e-5 at the larger 224x224 reductions: 1e-4 leaves a 10x
   margin, while a real kernel bug (an index, a sign, a missing term) shows up at 1e-2 or
   more. The comparison is made at initialisation, where the zero-initialised offset
   projections put every sampling point exactly on a pixel, so both sides take the same side
   of the (one-sided) offset gradient. The same batch under bfloat16 autocast is reported
   against the CPU's float32 (bfloat16 keeps 8 bits: about 6e-2 per tensor on the CPU;
   reported, not checked).
2. Training: ``--iterations`` AdamW steps on a fixed random batch (random labels, so the
   model can only memorise it), in float32 and under bfloat16 autocast: every loss finite,
   and the mean of the last fifth of the losses below half the mean of the first fifth.

The backend actually used is read back (``ops_dcnv3.get_backend``) so that a silent fallback
(the self-check rejecting a kernel) fails the check instead of passing on the reference.
Writes one JSON object (``--json``) and prints a summary; exit status 1 if anything failed.

    python tools/gpu_train_check.py [--backends cuda triton] [--iterations 50] [--json OUT]
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

import internimage
import ops_dcnv3


def make_model(seed):
    torch.manual_seed(seed)
    # No drop path, so that the CPU and GPU passes are the same function of the weights.
    return internimage.build_model("internimage_t", num_classes=100, drop_path_rate=0.0)


def make_batch(batch, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator), torch.randint(0, 100, (batch,), generator=generator)


def gradients(model, images, labels, device, autocast_dtype=None):
    model = model.to(device).eval()
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
    loss.backward()
    return {name: p.grad.detach().float().cpu() for name, p in model.named_parameters() if p.grad is not None}


def compare_gradients(got, expected):
    """Worst per-tensor relative error (Euclidean norms; absolute where the CPU's gradient is
    zero, as for the depthwise branch of blocks whose offsets start at zero) and its parameter."""
    assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))
    worst, worst_name = 0.0, None
    for name, reference in expected.items():
        error = (got[name] - reference).norm().item() / (reference.norm().item() or 1.0)
        if not error <= worst:  # NaN counts as worst
            worst, worst_name = error, name
    return worst, worst_name


def train(model, images, labels, device, iterations, autocast_dtype=None, lr=1e-3):
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    images, labels = images.to(device), labels.to(device)
    losses = []
    start = time.perf_counter()
    for _ in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    finite = all(math.isfinite(v) for v in losses)
    window = max(1, len(losses) // 5)  # averages over windows, as single losses are noisy
    head, tail = losses[:window], losses[-window:]
    falling = finite and sum(tail) / len(tail) < 0.5 * sum(head) / len(head)
    return dict(losses=losses, finite=finite, falling=falling, seconds=seconds, ok=finite and falling)


def check_backend(backend, args, device):
    ops_dcnv3.set_backend(backend)
    result = dict(backend=backend)
    cpu_images, cpu_labels = make_batch(args.grad_batch, args.size, seed=1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = make_model(seed=0)
    expected = gradients(model, cpu_images, cpu_labels, torch.device("cpu"))
    got = gradients(model, cpu_images, cpu_labels, device)
    result["backend_in_use"] = ops_dcnv3.get_backend(device) if device.type == "cuda" else "cpu"
    error, name = compare_gradients(got, expected)
    result["float32_gradients"] = dict(max_rel_err=error, worst_parameter=name, tolerance=args.grad_tol,
                                       ok=error <= args.grad_tol)
    error, name = compare_gradients(gradients(model, cpu_images, cpu_labels, device, torch.bfloat16), expected)
    result["bfloat16_gradients"] = dict(max_rel_err=error, worst_parameter=name, checked=False)

    torch.backends.cuda.matmul.allow_tf32 = True  # training as users run it
    torch.backends.cudnn.allow_tf32 = True
    images, labels = make_batch(args.batch, args.size, seed=2)
    result["train_float32"] = train(make_model(seed=0), images, labels, device, args.iterations)
    result["train_bfloat16"] = train(make_model(seed=0), images, labels, device, args.iterations, torch.bfloat16)
    result["ok"] = (result["backend_in_use"] in (backend, "cpu") and result["float32_gradients"]["ok"]
                    and result["train_float32"]["ok"] and result["train_bfloat16"]["ok"])
    return result


def summary(result):
    lines = [f"backend {result['backend']} (in use: {result['backend_in_use']}): {'PASS' if result['ok'] else 'FAIL'}"]
    grads = result["float32_gradients"]
    lines.append(f"  float32 gradients vs CPU: max rel err {grads['max_rel_err']:.2e} in {grads['worst_parameter']} "
                 f"(tolerance {grads['tolerance']:g}) {'ok' if grads['ok'] else 'FAIL'}")
    grads = result["bfloat16_gradients"]
    lines.append(f"  bfloat16 autocast gradients vs CPU float32: max rel err {grads['max_rel_err']:.2e} "
                 f"in {grads['worst_parameter']} (reported only)")
    for key in ("train_float32", "train_bfloat16"):
        run = result[key]
        lines.append(f"  {key}: loss {run['losses'][0]:.3f} -> {run['losses'][-1]:.3f} in {len(run['losses'])} steps "
                     f"({run['seconds']:.1f} s), finite {run['finite']}, falling {run['falling']}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=ops_dcnv3.functions.CUDA_BACKENDS, default=["cuda", "triton"])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--grad-batch", type=int, default=2, help="batch of the CPU/GPU gradient comparison")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--grad-tol", type=float, default=1e-4)
    parser.add_argument("--device", default="cuda", help="'cpu' only to try the script itself without a GPU")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_train_check: no GPU visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, iterations=args.iterations, batch=args.batch, size=args.size, results=[])
    for backend in args.backends:
        result = check_backend(backend, args, device)
        report["results"].append(result)
        print(summary(result), flush=True)
    report["ok"] = all(r["ok"] for r in report["results"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
