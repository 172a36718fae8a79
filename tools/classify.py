"""Classify images with an InternImage classifier, preprocessed as the model was evaluated.

    python tools/classify.py IMAGE [IMAGE ...] MODEL [--topk 5] [--device cpu] [--json]

MODEL is a Hugging Face hub folder (or its weights file next to its ``config.json``),
whose ``preprocessor_config.json`` gives the preprocessing; or a release name
(``internimage_t_1k_224``, downloaded), or any checkpoint file or URL of a released
variant, preprocessed as the official evaluation does (bicubic; at 224 resize to 256 and
centre-crop, above 224 resize to the input size). ``--variant`` states the architecture
of a checkpoint that the weights do not tell apart.

Prints, for each image, the top-k classes with their probabilities (ImageNet class names
for 1000- and 21841-class heads).
"""
import argparse
import json
import os
import sys


def load_model(spec, variant=None):
    """(model, timm data config, where it came from) for a hub folder, release name or checkpoint."""
    import internimage
    from internimage.checkpoint import load_classifier_weights, load_file, to_state_dict
    from internimage.checkpoint.hub import hub_folder_of, infer_model_kwargs
    from internimage.models.variants import PRETRAINED_CFGS, data_config

    if hub_folder_of(spec) is not None and not variant:
        model = internimage.from_pretrained(spec)
        if not model.pretrained_cfg:
            raise ValueError(f"{spec} has no preprocessor_config.json; give --variant to use the official "
                             "evaluation preprocessing of that variant")
        return model, model.pretrained_cfg, f"{spec} (its preprocessor_config.json)"
    release = None
    if spec in PRETRAINED_CFGS:
        release, spec = spec, PRETRAINED_CFGS[spec]["url"]
    checkpoint = load_file(spec)
    state_dict = to_state_dict(checkpoint)
    kwargs, inferred = infer_model_kwargs(state_dict, source=spec, variant=variant)
    release = release or inferred
    model = internimage.InternImageClassifier(**kwargs)
    load_classifier_weights(model, checkpoint)
    return model.eval(), data_config(release), f"the official evaluation of {release}"


def class_names(num_classes):
    """ImageNet class descriptions for a 1k or 22k head, else None."""
    from timm.data import ImageNetInfo
    from timm.data.imagenet_info import infer_imagenet_subset

    subset = infer_imagenet_subset(dict(num_classes=num_classes))
    return ImageNetInfo(subset) if subset else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="IMAGE ... MODEL", help="image files, then the model")
    parser.add_argument("--variant", help="architecture of MODEL (t, s, b, l, xl, h, g) when it cannot be inferred")
    parser.add_argument("--topk", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()
    if len(args.paths) < 2:
        parser.error("give at least one IMAGE and the MODEL")
    *images, spec = args.paths
    for path in images:
        if not os.path.isfile(path):
            parser.error(f"IMAGE {path!r}: no such file")
    if args.topk < 1:
        parser.error(f"--topk must be >= 1, got {args.topk}")

    import torch
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform

    try:
        model, data_config, origin = load_model(spec, args.variant)
    except (ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    model = model.to(args.device)
    dtype = next(model.parameters()).dtype  # float32 for the releases
    transform = create_transform(**data_config, is_training=False)
    print(f"preprocessing from {origin}: {data_config}", file=sys.stderr)
    names = class_names(model.num_classes)
    results = {}
    for path in images:
        try:
            with Image.open(path) as image:
                batch = transform(image.convert("RGB")).unsqueeze(0).to(args.device, dtype)
        except (UnidentifiedImageError, OSError) as e:
            sys.exit(f"error: IMAGE {path!r} cannot be read as an image: {e}")
        with torch.no_grad():
            probs = model(batch).softmax(-1)[0]
        top = probs.topk(min(args.topk, probs.numel()))
        results[path] = [dict(index=int(i), probability=float(p),
                              label=names.index_to_description(int(i)) if names else None)
                         for p, i in zip(top.values, top.indices)]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for path, top in results.items():
        print(path)
        for entry in top:
            print(f"  {entry['probability']:7.2%}  {entry['index']:5d}  {entry['label'] or ''}")


if __name__ == "__main__":
    main()
