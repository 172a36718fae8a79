"""Publish a training checkpoint: drop optimizer state and history, keep meta, add the
versions, and name the file by its hash.

    python tools/publish_model.py IN_CKPT OUT_CKPT     # writes OUT_CKPT-<sha256[:8]>.pth
"""
import argparse
import os

from internimage.checkpoint.publish import publish_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_file", help="checkpoint written by training")
    parser.add_argument("out_file", help="output name; the hash is added before .pth")
    args = parser.parse_args()
    final = publish_checkpoint(args.in_file, args.out_file)
    print(f"published {final} ({os.path.getsize(final) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
