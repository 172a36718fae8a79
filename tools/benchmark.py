"""End-to-end CPU benchmark: InternImage-T against timm's ConvNeXt-T and Swin-T, and against
the same InternImage-T on the pure-PyTorch reference DCNv3 core (the official CPU path),
in float32 and under bfloat16 autocast.

Times are medians after warm-up, in one process with a fixed thread count, the models of
a case timed in turn (round-robin) so that load from elsewhere on the machine affects
them alike; the float32 and bfloat16 inference cases of a batch size are timed in the same
round-robin. Peak memory is the growth of peak RSS in a fresh subprocess running one more
step after warm-up. The output starts with the CPU's model name and vector/matrix ISA
flags, the DCNv3 kernel copy in use and whether oneDNN has native bfloat16 kernels, and
ends with the top-1 agreement of each classifier under bfloat16 autocast with its float32
self on random images (randomly initialised weights: a check of the bfloat16 path's
numerics, not of accuracy).

    python tools/benchmark.py [--threads N] [--repeats R] [--no-memory] [--no-bf16] [--json OUT]
    python tools/benchmark.py --throughput [--models internimage_t_1k_224 convnext_tiny] [--batch 8]
        [--device cpu|cuda]     # images/s at each model's native resolution, as the official --throughput

bfloat16 is fast only on CPUs with native bfloat16 arithmetic (AVX512-BF16, AMX); elsewhere
oneDNN and PyTorch emulate it and every model is several times slower than in float32.
"""
import argparse
import json

import torch

from internimage.utils.benchmark import cpu_description, median_seconds_round_robin, peak_rss_growth

MODELS = ("internimage_t", "internimage_t_reference", "convnext_tiny", "swin_tiny")
# (name, batch, H, W, mode); mode: inference | train | backbone | bf16 (autocast inference)
CASES = [
    ("cls 224 b1 inference", 1, 224, 224, "inference"),
    ("cls 224 b8 inference", 8, 224, 224, "inference"),
    ("cls 224 b8 train step", 8, 224, 224, "train"),
    ("det backbone 800x1333 b1", 1, 800, 1333, "backbone"),
]
BF16_CASES = [
    ("cls 224 b1 bf16 autocast", 1, 224, 224, "bf16"),
    ("cls 224 b8 bf16 autocast", 8, 224, 224, "bf16"),
]


def build(name, mode):
    import timm

    from internimage import InternImage, build_model
    core = "DCNv3_pytorch" if name.endswith("_reference") else "DCNv3"
    if name.startswith("internimage"):
        if mode == "backbone":
            return InternImage(arch="t", core_op=core, drop_path_rate=0.0)
        return build_model("internimage_t", core_op=core, drop_path_rate=0.0)
    timm_name = {"convnext_tiny": "convnext_tiny", "swin_tiny": "swin_tiny_patch4_window7_224"}[name]
    if mode == "backbone":
        if name == "swin_tiny":
            return None  # timm's Swin needs image sizes divisible by its windows
        return timm.create_model(timm_name, pretrained=False, features_only=True)
    return timm.create_model(timm_name, pretrained=False)


def make_step(model, mode, batch, height, width):
    images = torch.rand(batch, 3, height, width)
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        target = torch.randint(0, 1000, (batch,))

        def step():
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), target).backward()
            optimizer.step()
        return step
    model.eval()

    def step():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            model(images)
    return step


def time_models(names, case, repeats):
    """Median seconds per step of each model of a benchmark case, timed round-robin."""
    return {name: seconds for (_, name), seconds in time_cases(names, [case], repeats).items()}


def time_cases(names, cases, repeats):
    """Median seconds per step of each (case name, model) of several cases, all timed in one
    round-robin (e.g. float32 and bfloat16 inference at the same batch size)."""
    steps = {}
    for case in cases:
        _, batch, height, width, mode = case
        for name in names:
            model = build(name, mode)
            if model is not None:
                steps[(case[0], name)] = make_step(model, mode, batch, height, width)
    return median_seconds_round_robin(steps, repeats)


def top1_agreement(name, images=32, batch=8, size=224):
    """Fraction of random images whose bfloat16-autocast top-1 class equals the float32 one,
    and the largest logit difference relative to the largest float32 logit."""
    torch.manual_seed(0)
    model = build(name, "inference").eval()
    agree, worst = 0, 0.0
    with torch.inference_mode():
        for start in range(0, images, batch):
            x = torch.rand(min(batch, images - start), 3, size, size)
            full = model(x).float()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = model(x).float()
            agree += int((full.argmax(1) == half.argmax(1)).sum())
            worst = max(worst, ((full - half).abs().max() / full.abs().max()).item())
    return {"top1_agreement": agree / images, "images": images, "max_rel_logit_diff": worst}


def environment():
    """What the numbers depend on: CPU and ISA flags, the DCNv3 kernel copy, native bfloat16."""
    import ops_dcnv3
    from ops_dcnv3 import packed_linear

    return {"cpu": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "dcnv3_cpu_isa": ops_dcnv3.cpu_isa(), "onednn_native_bf16": packed_linear.BF16_AVAILABLE}


def memory_step(name, case_index):
    """The step whose peak memory ``--memory`` reports (built in a fresh process)."""
    case = (CASES + BF16_CASES)[case_index]
    return make_step(build(name, case[4]), case[4], *case[1:4])


def peak_memory_mb(name, case_index, threads):
    return peak_rss_growth(__file__, "memory_step", dict(name=name, case_index=case_index), threads) / 2**20


def throughput(names, batch, repeats, device="cpu"):
    """Images per second of each timm model at its pretrained resolution (the official
    ``--throughput``: inference on one fixed batch after warm-up), measured round-robin."""
    import timm

    import internimage  # noqa: F401  (registers the InternImage classifiers with timm)

    steps, sizes = {}, {}
    for name in names:
        model = timm.create_model(name, pretrained=False).to(device).eval()
        _, height, width = model.pretrained_cfg["input_size"]
        sizes[name] = height
        images = torch.rand(batch, 3, height, width, device=device)

        def step(model=model, images=images):
            with torch.inference_mode():
                model(images)
            if device != "cpu":
                torch.cuda.synchronize()
        steps[name] = step
    return {name: dict(images_per_s=batch / seconds, input_size=sizes[name], batch=batch)
            for name, seconds in median_seconds_round_robin(steps, repeats).items()}


def throughput_main(args):
    device = "cuda" if args.device == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    print(f"throughput on {cpu_description() if device == 'cpu' else torch.cuda.get_device_name()}, "
          f"threads: {torch.get_num_threads()}, batch {args.batch}, median of {args.repeats}")
    results = throughput(args.models, args.batch, args.repeats, device)
    for name, row in results.items():
        print(f"  {name:<28} {row['input_size']:>4}px {row['images_per_s']:9.1f} images/s")
    if len(results) > 1:
        first, *others = results
        for other in others:
            print(f"{first} / {other}: {results[first]['images_per_s'] / results[other]['images_per_s']:.2f}x "
                  "the throughput")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_description(), "threads": torch.get_num_threads(), "device": device,
                       "throughput": results}, f, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--throughput", action="store_true",
                        help="images/s of classifiers at their native resolution (see --models, --batch)")
    parser.add_argument("--models", nargs="+", default=["internimage_t_1k_224", "convnext_tiny"],
                        help="--throughput: timm model names (default: InternImage-T and ConvNeXt-T)")
    parser.add_argument("--batch", type=int, default=8, help="--throughput: batch size (default 8)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="--throughput: device")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 autocast cases")
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.throughput:
        return throughput_main(args)
    env = environment()
    print(f"torch {env['torch']}, CPU: {env['cpu']}, threads: {env['threads']}, DCNv3 kernels: "
          f"{env['dcnv3_cpu_isa']}, oneDNN native bfloat16: {'yes' if env['onednn_native_bf16'] else 'no'}, "
          f"median of {args.repeats} after warm-up")

    all_cases = CASES + ([] if args.no_bf16 else BF16_CASES)
    # Float32 and bfloat16 inference at the same batch size share one round-robin.
    groups = [[case] + [other for other in all_cases if other[4] == "bf16" and other[1:4] == case[1:4]]
              if case[4] == "inference" else [case] for case in CASES]
    results = {}
    for group in groups:
        times = time_cases(MODELS, group, args.repeats)
        for case in group:
            index = all_cases.index(case)
            for name in MODELS:
                if (case[0], name) not in times:
                    continue
                row = {"ms": times[(case[0], name)] * 1e3}
                if not args.no_memory:
                    row["peak_mb"] = peak_memory_mb(name, index, args.threads)
                results.setdefault(case[0], {})[name] = row
                print(f"  {case[0]:<26} {name:<24} {row['ms']:9.1f} ms"
                      + ("" if args.no_memory else f" {row['peak_mb']:8.0f} MB"), flush=True)

    print(f"\n{'case':<26}" + "".join(f"{m:>26}" for m in MODELS))
    for case, rows in results.items():
        print(f"{case:<26}" + "".join(f"{rows[m]['ms']:>23.1f} ms" if m in rows else f"{'-':>26}" for m in MODELS))
    print()
    for case, rows in results.items():
        ours = rows["internimage_t"]
        line = (f"{case}: InternImage-T / ConvNeXt-T time {ours['ms'] / rows['convnext_tiny']['ms']:.2f}x, "
                f"reference-core model / ours {rows['internimage_t_reference']['ms'] / ours['ms']:.2f}x")
        if not args.no_memory:
            line += f", memory ours / ConvNeXt-T {ours['peak_mb'] / rows['convnext_tiny']['peak_mb']:.2f}x"
        print(line)
    agreement = {}
    if not args.no_bf16:
        for name in ("internimage_t", "convnext_tiny"):
            agreement[name] = top1_agreement(name)
            print(f"bfloat16 autocast vs float32, {name}: top-1 agreement {agreement[name]['top1_agreement']:.0%} "
                  f"of {agreement[name]['images']} random images, largest logit difference "
                  f"{agreement[name]['max_rel_logit_diff']:.1%} of the largest logit")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env, repeats=args.repeats, results=results, bf16_agreement=agreement), f, indent=2)


if __name__ == "__main__":
    main()
