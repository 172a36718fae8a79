"""Loading official InternImage checkpoints, in any released format, into this project's models.

Formats recognised by :func:`to_state_dict` (one pure function, used by every loader):

* official classification: ``{'model': state_dict}``;
* mmdet 2.x / mmseg 0.x detectors and segmentors, and this project's (mmengine)
  checkpoints: ``{'state_dict': state_dict, 'meta': ...}``, backbone keys under ``backbone.``;
* a bare state dict.

``module.`` prefixes left by (Distributed)DataParallel are removed. Parameter names
are the official ones, so no key is renamed. Files are read with ``weights_only=True``.
"""
import logging
import os
import tempfile
from collections import OrderedDict
from typing import Dict, Iterable, Optional

import torch
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

from . import safe_load  # noqa: F401  (allow-lists mmengine's checkpoint contents)

# Classification-head modules of InternImageClassifier (absent from a backbone).
HEAD_PREFIXES = ("conv_head.", "head.", "dcnv3_head_x4.", "dcnv3_head_x3.", "clip_projector.", "fc_norm.")


def load_file(filename: str, map_location="cpu") -> dict:
    """Read a checkpoint from a path or URL (mmengine's loaders; ``weights_only=True``)."""
    return CheckpointLoader.load_checkpoint(filename, map_location=map_location)


def to_state_dict(checkpoint: dict) -> "OrderedDict[str, torch.Tensor]":
    """The model state dict inside any supported checkpoint object, without ``module.`` prefixes."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        state_dict = checkpoint["state_dict"]
    elif "model" in checkpoint and isinstance(checkpoint["model"], dict):
        state_dict = checkpoint["model"]
    else:
        state_dict = checkpoint
    out = OrderedDict()
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def backbone_state_dict(state_dict: Dict[str, torch.Tensor], prefix: Optional[str] = None) -> "OrderedDict":
    """Backbone weights out of a classifier, detector or segmentor state dict.

    With ``prefix`` (e.g. ``'backbone.'``) only keys under it are kept, prefix removed.
    Without it, ``backbone.`` is used when present, otherwise the classification head is dropped.
    """
    if prefix is None and any(k.startswith("backbone.") for k in state_dict):
        prefix = "backbone."
    if prefix:
        prefix = prefix if prefix.endswith(".") else prefix + "."
        selected = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items() if k.startswith(prefix))
        if not selected:
            raise KeyError(f"no key of the checkpoint starts with {prefix!r}")
        return selected
    return OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES))


def load_state_dict_checked(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor],
                            skip_mismatched: Iterable[str] = (), logger="current", source: str = "checkpoint"):
    """Load ``state_dict`` into ``model``, reporting what does not match.

    A shape mismatch raises ``ValueError`` naming the key and both shapes, except under
    a prefix of ``skip_mismatched`` (e.g. a classifier head with another class count),
    where the key is skipped with one log line. Missing layer-scale gammas keep their
    initial value (1.0 in the detection configs of T, which equals no layer scale),
    said in one line; other missing and unexpected keys are listed in the log.
    """
    skip_mismatched = tuple(skip_mismatched)
    own = model.state_dict()
    loadable = OrderedDict()
    skipped = []
    for key, value in state_dict.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            if key.startswith(skip_mismatched):
                skipped.append(f"{key} {tuple(value.shape)} -> {tuple(own[key].shape)}")
                continue
            raise ValueError(f"shape mismatch for {key!r}: {source} has {tuple(value.shape)}, "
                             f"model has {tuple(own[key].shape)}")
        loadable[key] = value
    result = model.load_state_dict(loadable, strict=False)
    missing = [k for k in result.missing_keys if not any(s.startswith(k + " ") for s in skipped)]
    gammas = [k for k in missing if k.rsplit(".", 1)[-1] in ("gamma1", "gamma2")]
    others = [k for k in missing if k not in gammas]
    if skipped:
        print_log(f"Skipped {len(skipped)} weights whose shape differs (new head): {', '.join(skipped)}",
                  logger=logger)
    if gammas:
        values = torch.cat([own[k].flatten() for k in gammas]).unique()
        init = ", ".join(f"{v:g}" for v in values[:3].tolist())
        print_log(f"{source} has no layer-scale parameters: {len(gammas)} gamma1/gamma2 keep their "
                  f"initial value {init}" + (" (same as no layer scale)" if values.tolist() == [1.0] else ""),
                  logger=logger)
    if others:
        print_log(f"Missing keys in {source} ({len(others)}): {', '.join(others)}", logger=logger,
                  level=logging.WARNING)
    if result.unexpected_keys:
        print_log(f"Unexpected keys in {source} ({len(result.unexpected_keys)}): "
                  f"{', '.join(result.unexpected_keys)}", logger=logger, level=logging.WARNING)
    return result


def load_backbone_weights(backbone: torch.nn.Module, checkpoint, prefix: Optional[str] = None,
                          map_location="cpu", logger="current"):
    """Load the backbone part of any supported checkpoint (path, URL or loaded dict)."""
    source = checkpoint if isinstance(checkpoint, str) else "checkpoint"
    ckpt = load_file(checkpoint, map_location) if isinstance(checkpoint, str) else checkpoint
    print_log(f"Loading InternImage backbone weights from {source}", logger=logger)
    return load_state_dict_checked(backbone, backbone_state_dict(to_state_dict(ckpt), prefix),
                                   logger=logger, source=source)


def load_classifier_weights(model: torch.nn.Module, checkpoint, map_location="cpu", logger="current"):
    """Load a whole classifier; a head with another number of classes is skipped with a log line."""
    source = checkpoint if isinstance(checkpoint, str) else "checkpoint"
    ckpt = load_file(checkpoint, map_location) if isinstance(checkpoint, str) else checkpoint
    state_dict = to_state_dict(ckpt)
    if any(k.startswith("backbone.") for k in state_dict):  # a detector/segmentor: backbone only
        state_dict = backbone_state_dict(state_dict)
    return load_state_dict_checked(model, state_dict, skip_mismatched=HEAD_PREFIXES, logger=logger,
                                   source=source)


def save_atomic(obj, path: str):
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pth")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def convert_checkpoint(src, dst: str) -> dict:
    """Write any supported checkpoint (path, URL or dict) in this project's (mmengine) form."""
    from .version import __version__

    ckpt = load_file(src) if isinstance(src, str) else src
    meta = dict(ckpt.get("meta") or {}) if isinstance(ckpt, dict) else {}
    if "CLASSES" in meta and "dataset_meta" not in meta:  # mmdet 2.x / mmseg 0.x naming
        meta["dataset_meta"] = {"classes": tuple(meta["CLASSES"])}
    meta.update(internimage_version=__version__, converted_from=src if isinstance(src, str) else "<dict>")
    converted = {"state_dict": to_state_dict(ckpt), "meta": meta}
    save_atomic(converted, dst)
    return converted
