"""Parameters and FLOPs (multiply-accumulates) of an InternImage variant or a config.

    python tools/get_flops.py --variant t [--shape 224] [--json]
    python tools/get_flops.py configs/mask_rcnn/mask-rcnn_internimage-t_fpn_1x_coco.py --shape 800 1280

A variant is its 1000-class classifier (default shape: the released resolution); a
config is its whole detector or segmentor. See internimage/checkpoint/flops.py for the counting rule.
"""
import argparse
import json
import os

from mmengine.config import Config

from internimage.checkpoint.flops import MIN_SIZE, classifier_complexity, config_complexity
from internimage.models.variants import ARCH_SETTINGS, DEFAULT_PRETRAINED, PRETRAINED_CFGS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="mmdet/mmseg config file")
    parser.add_argument("--variant", choices=list(ARCH_SETTINGS), help="an InternImage classifier variant")
    parser.add_argument("--shape", type=int, nargs="+", help="input H [W] (default: the variant's resolution, "
                        "or 1280x800 for a config)")
    parser.add_argument("--json", action="store_true", help='print one JSON object {"params", "flops", ...}')
    args = parser.parse_args()
    if (args.config is None) == (args.variant is None):
        parser.error("give either a CONFIG or --variant")
    if args.shape is not None:
        if len(args.shape) > 2:
            parser.error(f"--shape takes H or H W, got {len(args.shape)} numbers: {args.shape}")
        if any(size < MIN_SIZE for size in args.shape):
            parser.error(f"--shape must be at least {MIN_SIZE} pixels (the backbone downsamples by 32), "
                         f"got {' '.join(map(str, args.shape))}")
    if args.config is not None and not os.path.isfile(args.config):
        parser.error(f"config file not found: {args.config}")
    if args.variant:
        default = PRETRAINED_CFGS[DEFAULT_PRETRAINED[args.variant]]["input_size"]
        height, width = (args.shape * 2)[:2] if args.shape is not None else (default, default)
        params, flops = classifier_complexity(args.variant, height, width)
        name = f"internimage_{args.variant}"
    else:
        height, width = (args.shape * 2)[:2] if args.shape is not None else (800, 1280)
        params, flops = config_complexity(Config.fromfile(args.config), height, width)
        name = args.config
    if args.json:
        print(json.dumps({"model": name, "shape": [height, width], "params": params, "flops": flops}))
    else:
        print(f"{name} at {height}x{width}: params {params / 1e6:.2f}M, FLOPs (MACs) {flops / 1e9:.2f}G")


if __name__ == "__main__":
    main()
