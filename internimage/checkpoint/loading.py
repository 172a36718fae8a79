"""Loading official InternImage checkpoints, in any released format, into this project's models.

Formats recognised by :func:`to_state_dict` (one pure function, used by every loader):

* official classification: ``{'model': state_dict}``;
* mmdet 2.x / mmseg 0.x detectors and segmentors, and this project's (mmengine)
  checkpoints: ``{'state_dict': state_dict, 'meta': ...}``, backbone keys under ``backbone.``;
* a bare state dict;
* the Hugging Face hub layout of the releases (a folder with ``config.json`` and
  ``model.safetensors`` / ``pytorch_model.bin``, keys renamed back to the official ones by
  :mod:`internimage.checkpoint.hub`).

``module.`` prefixes left by (Distributed)DataParallel are removed. Parameter names
are the official ones, so no key is renamed.

Every file is read with ``torch.load(weights_only=True)`` and the allow-list of
:mod:`internimage.checkpoint.safe_load`, local paths and http(s) URLs alike. A URL is downloaded into
torch.hub's cache (``$TORCH_HOME/hub/checkpoints``) first, its hash checked when its name
carries one, and only then unpickled; a file that fails the check is deleted from the cache.
Importing this module replaces mmengine's http(s) checkpoint loader, which unpickles a
download with ``weights_only=False`` (so any code in it runs), by that safe one
(:func:`load_from_http_safe`); mmengine's other loaders are left as they are.

Official releases can be named ``internimage://<release name>`` (the configs do), e.g.
``internimage://internimage_l_22k_384``; the name resolves to its URL through
:data:`internimage.models.variants.PRETRAINED_CFGS`.

Hash check: a file named ``NAME-<8 to 64 hex digits>.pth`` (torch.hub's convention, and
what ``tools/publish_model.py`` writes) must have a sha256 that starts with those digits
(either case). It applies to URLs and to the files this project's loaders and tools read;
set ``INTERNIMAGE_VERIFY_HASH=0`` (or pass ``verify_hash=False``) for a file whose name only
looks like that, e.g. ``model-20240101.pth``.
"""
import contextlib
import hashlib
import logging
import os
import pickle
import re
import urllib.parse
from collections import OrderedDict
from typing import Dict, Iterable, Optional

import mmengine.runner.checkpoint as mmengine_checkpoint
import torch
from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

from ..engine.fileio import atomic_output
from . import hub, safe_load  # noqa: F401  (safe_load allow-lists mmengine's checkpoint contents)

# Classification-head modules of InternImageClassifier (absent from a backbone).
HEAD_PREFIXES = ("conv_head.", "head.", "dcnv3_head_x4.", "dcnv3_head_x3.", "clip_projector.", "fc_norm.")
HASH_IN_NAME = re.compile(r"-([0-9a-fA-F]{8,64})\.pth$")
VERIFY_ENV = "INTERNIMAGE_VERIFY_HASH"
# The official ImageNet-22k -> 1k class map, copied unchanged from OpenGVLab/InternImage
# (classification/meta_data/map22kto1k.txt): line i is the 22k index of 1k class i.
MAP_22K_TO_1K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "map22kto1k.txt")
IN22K_CLASSES, IN1K_CLASSES = 21841, 1000
# A checkpoint must provide at least this fraction of a model's state-dict entries to count
# as that model's weights (layer-scale gammas and a new head may be missing; nothing at all
# matching means the wrong file).
MIN_MATCHED_FRACTION = 0.5


def _is_url(filename: str) -> bool:
    return filename.startswith(("http://", "https://"))


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_in_name(path: str) -> Optional[str]:
    """The sha256 prefix a file name carries (``NAME-<hex>.pth``, lower-cased), or ``None``."""
    match = HASH_IN_NAME.search(os.path.basename(path))
    return match.group(1).lower() if match else None


def verification_enabled(verify_hash: Optional[bool] = None) -> bool:
    """``verify_hash`` when given, else ``$INTERNIMAGE_VERIFY_HASH`` (on unless it is ``0``)."""
    if verify_hash is not None:
        return bool(verify_hash)
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def verify_hash_in_name(path: str, verify_hash: Optional[bool] = None, source: Optional[str] = None
                        ) -> Optional[str]:
    """If ``path`` is named ``...-<hex>.pth``, check that its sha256 starts with ``<hex>``.

    Returns the full sha256 when checked, ``None`` when the name carries no hash or checks
    are off; raises ``ValueError`` naming the file (or ``source``) when the content differs.
    """
    expected = hash_in_name(path)
    if expected is None or not verification_enabled(verify_hash):
        return None
    actual = sha256_of(path)
    if not actual.startswith(expected):
        raise ValueError(f"checkpoint {source or path} is corrupt or was modified: its name says sha256 "
                         f"{expected}..., its content has sha256 {actual[:len(expected)]}...; download or "
                         f"publish it again (if the name only looks like NAME-<hash>.pth, set {VERIFY_ENV}=0)")
    return actual


def torch_load_safe(path: str, map_location="cpu", source: Optional[str] = None):
    """``torch.load(weights_only=True)`` with an error that names where the file came from."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"refusing to load checkpoint {source or path}: it holds objects other than tensors and "
            f"plain data, which could run code when unpickled (loaded with weights_only=True). {error}") from None


def download_checkpoint(url: str, model_dir: Optional[str] = None, progress: bool = False,
                        verify_hash: Optional[bool] = None) -> str:
    """Download ``url`` into ``model_dir`` (default: torch.hub's checkpoint cache) unless it is
    there, check the hash its name carries, and return the local path. Nothing is unpickled.
    A file that fails the check is deleted from the cache."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise ValueError(f"checkpoint URL {url} names no file")
    model_dir = model_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(model_dir, exist_ok=True)
    cached = os.path.join(model_dir, name)
    if not os.path.isfile(cached):
        print_log(f"Downloading {url} to {cached}", logger="current")
        try:
            torch.hub.download_url_to_file(url, cached, hash_prefix=None, progress=progress)
        except Exception as error:
            raise OSError(f"could not download checkpoint {url}: {error}") from error
    try:
        verify_hash_in_name(cached, verify_hash, source=url)
    except ValueError:
        os.remove(cached)
        raise
    return cached


def load_from_http_safe(filename: str, map_location=None, model_dir: Optional[str] = None,
                        progress: bool = False, verify_hash: Optional[bool] = None):
    """mmengine's http(s) checkpoint loader made safe: download (the first rank first in
    distributed runs, as mmengine does), check the hash in the name, then
    ``torch.load(weights_only=True)``."""
    rank, world_size = get_dist_info()
    error = None
    if rank == 0:
        try:
            path = download_checkpoint(filename, model_dir, progress, verify_hash)
        except Exception as exc:  # the other ranks must not wait in the barrier for ever
            error = exc
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            path = download_checkpoint(filename, model_dir, progress, verify_hash)
    if error is not None:
        raise error
    try:
        return torch_load_safe(path, map_location, source=filename)
    except pickle.UnpicklingError:
        if rank == 0:  # never keep an unloadable download around to be tried again
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        raise


def install_safe_http_loader():
    """Route mmengine's http(s) checkpoints (and the ``torchvision://``, ``open-mmlab://`` and
    ``mmcls://`` schemes, which resolve to URLs and call ``load_from_http``) through
    :func:`load_from_http_safe`."""
    CheckpointLoader.register_scheme(prefixes=("http://", "https://"), loader=load_from_http_safe, force=True)
    mmengine_checkpoint.load_from_http = load_from_http_safe


install_safe_http_loader()

RELEASE_SCHEME = "internimage://"


@CheckpointLoader.register_scheme(prefixes=RELEASE_SCHEME)
def load_from_release(filename: str, map_location=None):
    """``internimage://NAME``: an official release by name (``internimage_l_22k_384``, see
    :data:`internimage.models.variants.PRETRAINED_CFGS`) or variant (``l``: its ImageNet-1k
    classifier), downloaded and loaded as :func:`load_from_http_safe` does."""
    from ..models.variants import pretrained_url

    return load_from_http_safe(pretrained_url(filename[len(RELEASE_SCHEME):]), map_location)


def load_file(filename: str, map_location="cpu", verify_hash: Optional[bool] = None) -> dict:
    """Read a checkpoint from a path or URL: hash checked when the name carries one, then
    ``torch.load(weights_only=True)``. A Hugging Face hub folder (or its weights file) is read
    by :func:`internimage.checkpoint.hub.load_hub_checkpoint`. Other mmengine schemes
    (``s3://`` etc.) go through mmengine's loaders."""
    if _is_url(filename):
        return load_from_http_safe(filename, map_location, verify_hash=verify_hash)
    if "://" in filename:
        return CheckpointLoader.load_checkpoint(filename, map_location=map_location)
    path = os.path.expanduser(filename)
    if hub.hub_folder_of(path) is not None:
        return hub.load_hub_checkpoint(path, map_location)
    if os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {filename} is a folder, but not a Hugging Face hub folder "
                                f"(no {hub.CONFIG_NAME} or {' / '.join(hub.WEIGHT_FILES)} in it)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {filename} not found")
    verify_hash_in_name(path, verify_hash)
    return torch_load_safe(path, map_location)


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


def backbone_state_dict(state_dict: Dict[str, torch.Tensor], prefix: Optional[str] = None,
                        drop_head: bool = True) -> "OrderedDict":
    """Backbone weights out of a classifier, detector or segmentor state dict.

    With ``prefix`` (e.g. ``'backbone.'``) only keys under it are kept, prefix removed.
    Without it, ``backbone.`` is used when present. The classification head is dropped
    unless ``drop_head=False`` (a classifier's weights under ``backbone.``, as mmpretrain's
    ``ImageClassifier`` holds them, for a classifier).
    """
    if prefix is None and any(k.startswith("backbone.") for k in state_dict):
        prefix = "backbone."
    if prefix:
        prefix = prefix if prefix.endswith(".") else prefix + "."
        selected = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items() if k.startswith(prefix))
        if not selected:
            raise KeyError(f"no key of the checkpoint starts with {prefix!r}")
        state_dict = selected  # a classifier trained here has its head under the prefix too
    if not drop_head:
        return OrderedDict(state_dict)
    return OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES))


def check_coverage(own_keys: Iterable[str], found_keys: Iterable[str], source: str,
                   min_fraction: float = MIN_MATCHED_FRACTION, what: str = "the model"):
    """Raise ``ValueError`` when ``found_keys`` provide fewer than ``min_fraction`` of
    ``own_keys`` (none at all when ``min_fraction`` is 0): the file is not this model's."""
    own_keys, found_keys = list(own_keys), list(found_keys)
    matched = len(set(own_keys) & set(found_keys))
    if own_keys and (matched == 0 or matched < min_fraction * len(own_keys)):
        raise ValueError(
            f"checkpoint {source} does not fit {what}: it provides {matched} of its {len(own_keys)} weights "
            f"(at least {min_fraction:.0%} expected). Expected keys like {own_keys[:3]}, found keys like "
            f"{found_keys[:3]}{' (the file is empty)' if not found_keys else ''}")
    return matched


def load_state_dict_checked(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor],
                            skip_mismatched: Iterable[str] = (), logger="current", source: str = "checkpoint",
                            min_fraction: float = MIN_MATCHED_FRACTION):
    """Load ``state_dict`` into ``model``, reporting what does not match.

    A checkpoint that provides fewer than ``min_fraction`` of the model's weights raises
    ``ValueError`` naming the file and a few expected and found keys (the wrong file would
    otherwise leave the model at random initialisation). A shape mismatch raises
    ``ValueError`` naming the key and both shapes, except under a prefix of
    ``skip_mismatched`` (e.g. a classifier head with another class count), where the key is
    skipped with one log line. Missing layer-scale gammas keep their initial value (1.0 in
    the detection configs of T, which equals no layer scale), said in one line; other
    missing and unexpected keys are listed in the log.
    """
    skip_mismatched = tuple(skip_mismatched)
    own = model.state_dict()
    check_coverage(own.keys(), state_dict.keys(), source, min_fraction)
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


def check_hub_arch(model: torch.nn.Module, checkpoint: dict, source: str):
    """Raise ``ValueError`` when ``checkpoint`` came from a hub folder whose ``config.json``
    states an architecture other than ``model``'s (settings such as ``offset_scale`` change
    the outputs without changing any weight's shape, so the shape checks cannot see them)."""
    stated = ((checkpoint.get("meta") or {}).get("model_kwargs") or {}).get("arch") if isinstance(checkpoint, dict) \
        else None
    own = getattr(model, "arch_settings", None)
    if not stated or not own:
        return
    differ = {k: (v, own[k]) for k, v in stated.items() if k in own and v != own[k]}
    if differ:
        details = ", ".join(f"{k}: {a!r} in the folder, {b!r} in the model" for k, (a, b) in differ.items())
        raise ValueError(f"{source}: its config.json describes another architecture than the model's ({details})")


def load_backbone_weights(backbone: torch.nn.Module, checkpoint, prefix: Optional[str] = None,
                          map_location="cpu", logger="current"):
    """Load the backbone part of any supported checkpoint (path, URL or loaded dict)."""
    source = checkpoint if isinstance(checkpoint, str) else "checkpoint"
    ckpt = load_file(checkpoint, map_location) if isinstance(checkpoint, str) else checkpoint
    check_hub_arch(backbone, ckpt, source)
    print_log(f"Loading InternImage backbone weights from {source}", logger=logger)
    return load_state_dict_checked(backbone, backbone_state_dict(to_state_dict(ckpt), prefix),
                                   logger=logger, source=source)


def imagenet_22k_to_1k_rows() -> torch.Tensor:
    """The official map from ImageNet-1k classes to ImageNet-22k ones (:data:`MAP_22K_TO_1K`):
    entry i is the 22k class index of 1k class i."""
    with open(MAP_22K_TO_1K) as f:
        rows = [int(line) for line in f if line.strip()]
    if len(rows) != IN1K_CLASSES or not all(0 <= r < IN22K_CLASSES for r in rows):
        raise ValueError(f"{MAP_22K_TO_1K} must hold {IN1K_CLASSES} class indices below {IN22K_CLASSES}")
    return torch.tensor(rows)


def map_head_22k_to_1k(state_dict: Dict[str, torch.Tensor], num_classes: int, logger="current") -> Dict:
    """``state_dict`` with a 21,841-class classifier (``head.weight``/``head.bias``) cut to the
    1,000 ImageNet-1k classes when ``num_classes`` is 1,000, as the official fine-tuning does;
    otherwise unchanged."""
    head = state_dict.get("head.weight")
    if num_classes != IN1K_CLASSES or head is None or head.shape[0] != IN22K_CLASSES:
        return state_dict
    rows = imagenet_22k_to_1k_rows()
    mapped = OrderedDict(state_dict)
    for key in ("head.weight", "head.bias"):
        if key in mapped:
            mapped[key] = mapped[key].index_select(0, rows.to(mapped[key].device))
    print_log(f"Classifier head cut from {IN22K_CLASSES} ImageNet-22k to {IN1K_CLASSES} ImageNet-1k classes "
              f"with the official map ({os.path.basename(MAP_22K_TO_1K)})", logger=logger)
    return mapped


def load_classifier_weights(model: torch.nn.Module, checkpoint, map_location="cpu", logger="current",
                            head_22k_to_1k: bool = True):
    """Load a whole classifier; a head with another number of classes is skipped with a log line,
    except that a 21,841-class head loaded into a 1,000-class model is cut to the ImageNet-1k
    classes (:func:`map_head_22k_to_1k`; ``head_22k_to_1k=False`` skips it instead)."""
    source = checkpoint if isinstance(checkpoint, str) else "checkpoint"
    ckpt = load_file(checkpoint, map_location) if isinstance(checkpoint, str) else checkpoint
    check_hub_arch(model, ckpt, source)
    state_dict = to_state_dict(ckpt)
    if any(k.startswith("backbone.") for k in state_dict):  # an mmpretrain classifier, or a detector's backbone
        state_dict = backbone_state_dict(state_dict, drop_head=False)
    if head_22k_to_1k:
        state_dict = map_head_22k_to_1k(state_dict, getattr(model, "num_classes", None), logger)
    return load_state_dict_checked(model, state_dict, skip_mismatched=HEAD_PREFIXES, logger=logger,
                                   source=source)


def save_atomic(obj, path: str):
    """``torch.save`` so that ``path`` holds the old file or the whole new one, never a part."""
    with atomic_output(path) as f:
        torch.save(obj, f)


def refuse_overwriting(src: str, dst: str, what: str = "output"):
    """Raise ``ValueError`` when writing ``dst`` would replace the input file ``src``."""
    if isinstance(src, str) and not _is_url(src) and os.path.exists(src) and os.path.exists(dst) \
            and os.path.samefile(src, dst):
        raise ValueError(f"the {what} {dst} is the input file {src}: refusing to overwrite it; "
                         "choose another output name")


def convert_checkpoint(src, dst: str, head_22k_to_1k: bool = False) -> dict:
    """Write any supported checkpoint (path, URL or dict) in this project's (mmengine) form;
    with ``head_22k_to_1k`` a 21,841-class head is cut to ImageNet-1k's 1,000 classes."""
    from ..version import __version__

    refuse_overwriting(src, dst)
    ckpt = load_file(src) if isinstance(src, str) else src
    meta = dict(ckpt.get("meta") or {}) if isinstance(ckpt, dict) else {}
    if "CLASSES" in meta and "dataset_meta" not in meta:  # mmdet 2.x / mmseg 0.x naming
        meta["dataset_meta"] = {"classes": tuple(meta["CLASSES"])}
    meta.update(internimage_version=__version__, converted_from=src if isinstance(src, str) else "<dict>")
    state_dict = to_state_dict(ckpt)
    if head_22k_to_1k:
        head = state_dict.get("head.weight")
        if head is None or head.shape[0] != IN22K_CLASSES:
            raise ValueError(f"{src} has no {IN22K_CLASSES}-class head to cut to ImageNet-1k "
                             f"(head.weight: {None if head is None else tuple(head.shape)})")
        state_dict = map_head_22k_to_1k(state_dict, IN1K_CLASSES)
        meta["head_22k_to_1k"] = True
    converted = {"state_dict": state_dict, "meta": meta}
    save_atomic(converted, dst)
    return converted
