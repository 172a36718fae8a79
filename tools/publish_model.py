"""Publish a training checkpoint: drop optimizer state and history, keep meta, add the
versions, and name the file by its hash.

    python tools/publish_model.py IN_CKPT OUT_CKPT     # writes OUT_CKPT-<sha256[:8]>.pth
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internimage.publish import publish_checkpoint  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_file", help="checkpoint written by training")
    parser.add_argument("out_file", help="output name; the hash is added before .pth")
    args = parser.parse_args()
    final = publish_checkpoint(args.in_file, args.out_file)
    print(f"published {final} ({os.path.getsize(final) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
