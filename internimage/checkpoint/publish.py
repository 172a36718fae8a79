"""Publishing checkpoints: training state stripped, the file named by its hash.

A published file is named ``NAME-<first 8 hex digits of its sha256>.pth`` (torch.hub's
convention). The project's loaders and tools check that prefix when they read such a
file (see :mod:`internimage.checkpoint`), so a corrupted or altered release fails with a
clear message instead of loading.
"""
import os

import torch

from .loading import load_file, refuse_overwriting, save_atomic, sha256_of

# Kept from a training checkpoint; optimizer state, schedulers and the message hub go.
_KEPT_META = ("cfg", "dataset_meta", "epoch", "iter", "seed", "experiment_name", "time", "mmengine_version")


def publish_checkpoint(src: str, out: str) -> str:
    """Write ``src`` without training state as ``<out stem>-<sha256[:8]>.pth``; return that path.

    The input is never replaced or removed, whatever the names.
    """
    import mmcv

    from ..version import __version__

    ckpt = load_file(src)
    if "state_dict" not in ckpt:
        raise KeyError(f"{src} has no 'state_dict': not an mmengine training checkpoint")
    meta = {k: v for k, v in (ckpt.get("meta") or {}).items() if k in _KEPT_META}
    meta.update(internimage_version=__version__, torch_version=str(torch.__version__),
                mmcv_version=str(mmcv.__version__))
    stem = out[:-len(".pth")] if out.endswith(".pth") else out
    published = {"meta": meta, "state_dict": ckpt["state_dict"]}
    # The name depends on the bytes: write them once to find the hash, then under the final name.
    probe = f"{stem}.unhashed.pth"
    refuse_overwriting(src, probe)
    save_atomic(published, probe)
    final = f"{stem}-{sha256_of(probe)[:8]}.pth"
    try:
        refuse_overwriting(src, final)
        os.replace(probe, final)
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    return final
