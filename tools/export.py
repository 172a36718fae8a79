"""Export an InternImage model to ONNX, a torch.export program or an AOTInductor package.

    python tools/export.py --variant t [--checkpoint FILE] [--features] --format onnx --out t.onnx [--verify]
    python tools/export.py CONFIG [CHECKPOINT] [--features] --format onnx|export|aoti --out PATH [--verify]

    options: --shape H [W]       input size (default: the variant's release size / the config's crop)
             --dynamic-batch     batch size free in the graph (height and width stay fixed)
             --opset N           ONNX opset (default: the exporter's, 20; 18 is the lowest)
             --custom-op         ONNX: DCNv3 as one ops_dcnv3.DCNv3 node (needs a runtime plugin)
             --verify            check the file: onnx.checker, operator set, onnxruntime (CPU) vs
                                 PyTorch; for export/aoti a fresh process loads and runs it
             --verify-input F    also compare on this input (.npy or .pt, N x 3 x H x W), repeatable
             --tolerance T       largest relative error accepted (default 1e-4)

Without a checkpoint the model is randomly initialised (for trying the export). The ONNX file
needs no custom operator: DCNv3 is written in standard operators (GridSample, ...), see
``ops_dcnv3/onnx.py``. The .pt2 files call the compiled operator: load ``ops_dcnv3/_C*.so``
first (``torch.ops.load_library``) wherever they run. Inputs are normalised NCHW float32
images. Exits with 2 on a bad request, 1 when a check fails.
"""
import argparse
import logging
import os
import sys

import numpy as np
import torch
from mmengine.logging import print_log

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from internimage.deploy import (  # noqa: E402
    DEFAULT_TOLERANCE,
    VerificationError,
    build_from_config,
    build_from_variant,
    capture,
    check_onnx,
    compile_aoti,
    export_onnx,
    output_names_of,
    random_inputs,
    save_program,
    verify_onnx,
    verify_package,
)
from internimage.engine.runner_utils import DictAction  # noqa: E402

EXTENSIONS = {"onnx": ".onnx", "export": ".pt2", "aoti": ".pt2"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Export an InternImage model (ONNX, torch.export, AOTInductor)")
    parser.add_argument("config", nargs="?", help="mmseg / mmdet / classification config (or use --variant)")
    parser.add_argument("config_checkpoint", nargs="?", metavar="CHECKPOINT", help="checkpoint of the config")
    parser.add_argument("--variant", help="t, s, b, l, xl, h or g: the classifier (or its backbone with --features)")
    parser.add_argument("--checkpoint", help="checkpoint of the variant (any released format, path or URL)")
    parser.add_argument("--format", required=True, choices=sorted(EXTENSIONS))
    parser.add_argument("--out", required=True, help="output file (.onnx, or .pt2 for export/aoti)")
    parser.add_argument("--features", action="store_true", help="export the backbone (+ neck) features")
    parser.add_argument("--shape", type=int, nargs="+", metavar="H [W]", help="input height and width")
    parser.add_argument("--dynamic-batch", action="store_true", help="leave the batch size free")
    parser.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    parser.add_argument("--custom-op", action="store_true",
                        help="ONNX: emit DCNv3 as one ops_dcnv3.DCNv3 node for runtimes with a plugin")
    parser.add_argument("--verify", action="store_true", help="check the exported file against PyTorch")
    parser.add_argument("--verify-input", action="append", default=[], metavar="FILE",
                        help="an input batch (.npy / .pt, N x 3 x H x W) to compare on as well")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest relative error --verify accepts (default %(default)g)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys, k=v")
    args = parser.parse_args(argv)
    if (args.variant is None) == (args.config is None):
        parser.error("give either --variant V [--checkpoint F] or CONFIG [CHECKPOINT]")
    if args.variant is not None and args.config_checkpoint is not None:
        parser.error("a positional CHECKPOINT goes with a CONFIG; with --variant use --checkpoint")
    if args.config is not None and args.checkpoint is not None:
        if args.config_checkpoint is not None:
            parser.error("give the config's checkpoint once (positional or --checkpoint)")
        args.config_checkpoint = args.checkpoint
    if args.shape is not None and (len(args.shape) not in (1, 2) or min(args.shape) < 1):
        parser.error(f"--shape takes H or H W, positive, got {args.shape}")
    if args.opset is not None and args.format != "onnx":
        parser.error("--opset applies to --format onnx only")
    if args.custom_op and args.format != "onnx":
        parser.error("--custom-op applies to --format onnx only")
    if not args.out.endswith(EXTENSIONS[args.format]):
        parser.error(f"--out for --format {args.format} must end with {EXTENSIONS[args.format]}, got {args.out}")
    return parser, args


def load_input(path: str, input_size) -> torch.Tensor:
    """A user-given input batch: a float (N, 3, H, W) array in .npy (no pickles) or .pt (tensors only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--verify-input {path} not found")
    if path.endswith(".npy"):
        tensor = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"--verify-input {path} must hold one tensor, got {type(tensor).__name__}")
    if tensor.dim() == 3:
        tensor = tensor[None]
    want = (3, *input_size)
    if tensor.dim() != 4 or tuple(tensor.shape[1:]) != want:
        raise ValueError(f"--verify-input {path} has shape {tuple(tensor.shape)}, the export expects "
                         f"(N, {', '.join(map(str, want))})")
    return tensor.float().contiguous()


def export(args) -> list:
    """Build, capture, write and (with --verify) check; returns the comparisons made."""
    if args.variant is not None:
        target = build_from_variant(args.variant, args.checkpoint, features=args.features)
    else:
        target = build_from_config(args.config, args.config_checkpoint, features=args.features,
                                   cfg_options=args.cfg_options)
    input_size = target.input_size if args.shape is None else (args.shape[0], args.shape[-1])
    given = {f"given {os.path.basename(p)}": load_input(p, input_size) for p in args.verify_input}
    if given and not args.verify:
        raise ValueError("--verify-input needs --verify")
    if not args.dynamic_batch and any(x.shape[0] != 1 for x in given.values()):
        raise ValueError("an input with a batch other than 1 needs --dynamic-batch (the graph's batch is fixed at 1)")
    print_log(f"Exporting {target.description} at {input_size[0]}x{input_size[1]} as {args.format} to {args.out}",
              logger="current")
    example = random_inputs(input_size, [2 if args.dynamic_batch else 1], seed=1)
    example = next(iter(example.values()))
    output_names = output_names_of(target.module, example, target.output_names)
    program = capture(target.module, example, dynamic_batch=args.dynamic_batch)
    if args.format == "onnx":
        export_onnx(program, args.out, output_names, opset=args.opset, custom_op=args.custom_op)
    elif args.format == "export":
        save_program(program, args.out)
    else:
        compile_aoti(program, args.out)
    if not args.verify:
        return []
    # Batch 3 differs from the capture's example, so a dynamic batch is really exercised.
    inputs = dict(random_inputs(input_size, [1, 3] if args.dynamic_batch else [1]), **given)
    if args.format == "onnx":
        report = check_onnx(args.out, custom_op=args.custom_op)
        opsets = ", ".join(f"{domain} {version}" for domain, version in report["opsets"].items())
        print_log(f"onnx.checker: ok. Opsets: {opsets}. Operators: "
                  + ", ".join(f"{op} x{n}" for op, n in report["ops"].items()), logger="current")
        if args.custom_op:
            print_log("Parity not checked: stock onnxruntime has no kernel for ops_dcnv3.DCNv3 "
                      "(export without --custom-op for a file it runs)", logger="current", level=logging.WARNING)
            return []
        results = verify_onnx(args.out, target.module, inputs, output_names, tolerance=args.tolerance)
    else:
        results = verify_package(args.format, args.out, target.module, inputs, output_names, tolerance=args.tolerance)
    print_log(f"Verified {args.out}: within relative error {args.tolerance:g} of PyTorch", logger="current")
    return results


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        return export(args)
    except VerificationError as error:
        parser.exit(1, f"{parser.prog}: verification failed: {error}\n")
    except (ValueError, KeyError, FileNotFoundError, ImportError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        parser.exit(2, f"{parser.prog}: error: {message}\n")


if __name__ == "__main__":
    main()
