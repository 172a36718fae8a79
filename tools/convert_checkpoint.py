"""Convert an InternImage checkpoint between the official formats and this project's.

Reads any released format (classification ``{'model': ...}``, mmdet 2.x / mmseg 0.x
``{'state_dict': ..., 'meta': ...}``, a bare state dict, a Hugging Face hub folder or its
weights file; ``module.`` prefixes removed) and writes

* by default, ``{'state_dict': ..., 'meta': ...}`` as mmengine saves it, to OUT;
* with ``--to hf``, a classifier in the Hugging Face hub layout of the official releases
  to the folder OUT (``config.json``, ``preprocessor_config.json``, ``model.safetensors``
  with the official key names), for the official remote code.

    python tools/convert_checkpoint.py IN OUT [--head-22k-to-1k]
    python tools/convert_checkpoint.py IN OUT_DIR --to hf [--variant t] [--weights bin]

For ``--to hf`` the architecture comes from, in this order: ``--model-config`` (a JSON
file of InternImageClassifier arguments), ``--variant``, the ``config.json`` of a hub
folder read in, or the weights themselves (the released variants are told apart by their
width and depths). The preprocessing written is the official evaluation of the release.
"""
import argparse
import json
import os


def to_hf(args):
    from internimage.checkpoint import load_file, to_state_dict
    from internimage.checkpoint.hub import hub_folder_of, infer_model_kwargs, save_hub_folder
    from internimage.models.variants import data_config

    checkpoint = load_file(args.src)
    state_dict = to_state_dict(checkpoint)
    meta = checkpoint.get("meta") or {}
    kwargs, release = None, None
    if args.model_config:
        with open(args.model_config) as f:
            kwargs = json.load(f)
    elif meta.get("model_kwargs") and not args.variant:  # converted from a hub folder: keep its config
        kwargs = meta["model_kwargs"]
    else:
        kwargs, release = infer_model_kwargs(state_dict, source=args.src, variant=args.variant)
    preprocessing = meta.get("data_config") or (data_config(release) if release else None)
    if os.path.isfile(args.dst):
        raise SystemExit(f"--to hf writes a folder, and {args.dst} is a file; give a folder name")
    source_folder = hub_folder_of(args.src)
    if source_folder and os.path.isdir(args.dst) and os.path.samefile(source_folder, args.dst):
        raise SystemExit(f"the output folder {args.dst} is the input folder: refusing to overwrite it")
    config = save_hub_folder(args.dst, state_dict, kwargs, data_config=preprocessing, weights=args.weights,
                             name=args.name)
    print(f"wrote {args.dst}: config.json ({config['channels']} channels, depths {config['depths']}, "
          f"{config['num_classes']} classes), {len(state_dict)} tensors"
          + ("" if preprocessing else "; no preprocessor_config.json (unknown preprocessing)"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="input checkpoint: path, URL, or Hugging Face hub folder")
    parser.add_argument("dst", help="output path (a folder with --to hf)")
    parser.add_argument("--to", choices=("mmengine", "hf"), default="mmengine",
                        help="output format (default: this project's mmengine checkpoint)")
    parser.add_argument("--variant", help="--to hf: the architecture of a released variant (t, s, b, l, xl, h, g)")
    parser.add_argument("--model-config", help="--to hf: JSON file of InternImageClassifier keyword arguments")
    parser.add_argument("--weights", choices=("safetensors", "bin"), default="safetensors",
                        help="--to hf: model.safetensors (default) or pytorch_model.bin")
    parser.add_argument("--name", help="--to hf: the hub name written as _name_or_path, e.g. me/internimage_t_ft")
    parser.add_argument("--head-22k-to-1k", action="store_true",
                        help="cut a 21,841-class ImageNet-22k head to the 1,000 ImageNet-1k classes "
                             "(the official map; for fine-tuning or evaluating on ImageNet-1k)")
    args = parser.parse_args()
    if args.to == "hf" and args.head_22k_to_1k:
        parser.error("--head-22k-to-1k writes this project's format; convert first, then write --to hf")
    if args.to == "hf":
        try:
            to_hf(args)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        return
    if args.variant or args.model_config:
        parser.error("--variant and --model-config only apply to --to hf")
    from internimage.checkpoint import convert_checkpoint

    try:
        converted = convert_checkpoint(args.src, args.dst, head_22k_to_1k=args.head_22k_to_1k)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.dst}: {len(converted['state_dict'])} tensors")


if __name__ == "__main__":
    main()
