"""Publishing checkpoints, and verifying published ones when they are loaded.

A published file is named ``NAME-<first 8 hex digits of its sha256>.pth`` (torch.hub's
convention). ``import internimage`` makes mmengine's checkpoint loading, for local paths
and http(s) URLs, check that prefix whenever a file name carries one, so a corrupted or
altered release fails with a clear message instead of loading.
"""
import hashlib
import os
import re
from typing import Optional

import torch
from mmengine.runner.checkpoint import CheckpointLoader, load_from_http, load_from_local

from .checkpoint import load_file, save_atomic

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth$")
# Kept from a training checkpoint; optimizer state, schedulers and the message hub go.
_KEPT_META = ("cfg", "dataset_meta", "epoch", "iter", "seed", "experiment_name", "time", "mmengine_version")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_hash_in_name(path: str) -> Optional[str]:
    """If ``path`` is named ``...-<hex>.pth``, check that its sha256 starts with ``<hex>``."""
    match = _HASH_IN_NAME.search(os.path.basename(path))
    if match is None:
        return None
    actual = sha256_of(path)
    if not actual.startswith(match.group(1)):
        raise ValueError(f"checkpoint {path} is corrupt or was modified: its name says sha256 {match.group(1)}..., "
                         f"its content has sha256 {actual[:len(match.group(1))]}...; download or publish it again")
    return actual


def _load_local_verified(filename, map_location):
    path = os.path.expanduser(filename)
    if os.path.isfile(path):
        verify_hash_in_name(path)
    return load_from_local(filename, map_location)


def _load_http_verified(filename, map_location=None, model_dir=None, **kwargs):
    checkpoint = load_from_http(filename, map_location=map_location, model_dir=model_dir, **kwargs)
    cached = os.path.join(model_dir or os.path.join(torch.hub.get_dir(), "checkpoints"),
                          os.path.basename(filename.split("?")[0]))
    if os.path.isfile(cached):
        verify_hash_in_name(cached)
    return checkpoint


def install_verifying_loaders():
    CheckpointLoader.register_scheme(prefixes="", loader=_load_local_verified, force=True)
    CheckpointLoader.register_scheme(prefixes=("http://", "https://"), loader=_load_http_verified, force=True)


def publish_checkpoint(src: str, out: str) -> str:
    """Write ``src`` without training state as ``<out stem>-<sha256[:8]>.pth``; return that path."""
    import mmcv

    from .version import __version__

    ckpt = load_file(src)
    if "state_dict" not in ckpt:
        raise KeyError(f"{src} has no 'state_dict': not an mmengine training checkpoint")
    meta = {k: v for k, v in (ckpt.get("meta") or {}).items() if k in _KEPT_META}
    meta.update(internimage_version=__version__, torch_version=str(torch.__version__), mmcv_version=str(mmcv.__version__))
    stem = out[:-len(".pth")] if out.endswith(".pth") else out
    tmp = stem + ".unhashed.pth"
    save_atomic({"meta": meta, "state_dict": ckpt["state_dict"]}, tmp)
    final = f"{stem}-{sha256_of(tmp)[:8]}.pth"
    os.replace(tmp, final)
    return final


install_verifying_loaders()
