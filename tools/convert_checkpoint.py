"""Convert an official InternImage checkpoint to this project's format.

Reads any released format (classification ``{'model': ...}``, mmdet 2.x / mmseg 0.x
``{'state_dict': ..., 'meta': ...}``, a bare state dict; ``module.`` prefixes removed)
and writes ``{'state_dict': ..., 'meta': ...}`` as mmengine saves it.

    python tools/convert_checkpoint.py IN OUT
"""
import argparse

from internimage.checkpoint import convert_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="input checkpoint (path or URL)")
    parser.add_argument("dst", help="output path")
    args = parser.parse_args()
    converted = convert_checkpoint(args.src, args.dst)
    print(f"wrote {args.dst}: {len(converted['state_dict'])} tensors")


if __name__ == "__main__":
    main()
