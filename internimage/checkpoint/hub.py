"""The Hugging Face hub layout of the official InternImage releases, read and written without
``transformers``.

A hub release (``OpenGVLab/internimage_t_1k_224`` and the others) is a folder:

* ``config.json``: ``model_type: internimage`` and every constructor argument of the
  official classifier (channels, depths, groups, layer_scale, ..., num_classes), next to
  transformers' own bookkeeping (``architectures``, ``auto_map``, ``torch_dtype``, ...);
* ``preprocessor_config.json``: a CLIP image processor (resize, centre crop, mean/std,
  ``resample`` as a PIL constant, 3 = bicubic);
* the weights, ``model.safetensors`` or ``pytorch_model.bin`` (or shards listed in a
  ``*.index.json``): the official state dict with every key prefixed ``model.`` and the
  layer-scale parameters ``gamma1``/``gamma2`` named ``layer_scale1``/``layer_scale2``.

:func:`load_hub_checkpoint` turns such a folder (or its weights file) into the project's
checkpoint form, official key names, after checking that ``config.json`` describes the
weights it sits next to; :func:`save_hub_folder` writes the layout back, so that a model
trained here can be published for the official remote code. Weights are read with
``safetensors`` or ``torch.load(weights_only=True)``, never by unpickling code.
"""
import json
import math
import os
from collections import OrderedDict
from typing import Dict, Optional

import torch
from mmengine.logging import print_log

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
# Weight files in the order they are looked for; the index files list shards.
WEIGHT_FILES = (SAFETENSORS_NAME, PICKLE_NAME)
INDEX_FILES = (SAFETENSORS_NAME + ".index.json", PICKLE_NAME + ".index.json")
MODEL_TYPE = "internimage"
KEY_PREFIX = "model."
# The official ``classification/huggingface`` conversion renames only these two.
RENAMED = {"gamma1": "layer_scale1", "gamma2": "layer_scale2"}

# Constructor arguments of the official classifier that config.json carries.
ARCH_FIELDS = ("channels", "depths", "groups", "offset_scale", "post_norm", "res_post_norm", "dw_kernel_size",
               "level2_post_norm", "level2_post_norm_block_ids", "center_feature_scale")
MODEL_FIELDS = ARCH_FIELDS + ("core_op", "num_classes", "mlp_ratio", "drop_rate", "drop_path_rate",
                              "drop_path_type", "act_layer", "norm_layer", "layer_scale", "cls_scale", "with_cp",
                              "use_clip_projector", "remove_center")
# transformers' bookkeeping, not architecture.
HF_FIELDS = ("_name_or_path", "architectures", "auto_map", "torch_dtype", "transformers_version", "model_type")
# Where the official remote code (configuration/modeling files) lives: config.json's
# auto_map points there, so a folder written here loads with ``trust_remote_code=True``
# without carrying a copy of that code.
REMOTE_CODE_REPO = "OpenGVLab/internimage_t_1k_224"
# PIL resampling constants, as CLIP image processors store them.
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# (Models are imported inside the functions: internimage.models imports this package.)


# --- keys ----------------------------------------------------------------------------

def hub_to_official_key(key: str) -> str:
    """``model.levels.0.blocks.0.layer_scale1`` -> ``levels.0.blocks.0.gamma1``."""
    if not key.startswith(KEY_PREFIX):
        raise KeyError(f"hub weight {key!r} does not start with {KEY_PREFIX!r}")
    head, _, last = key[len(KEY_PREFIX):].rpartition(".")
    last = {v: k for k, v in RENAMED.items()}.get(last, last)
    return f"{head}.{last}" if head else last


def official_to_hub_key(key: str) -> str:
    """``levels.0.blocks.0.gamma1`` -> ``model.levels.0.blocks.0.layer_scale1``."""
    head, _, last = key.rpartition(".")
    last = RENAMED.get(last, last)
    return KEY_PREFIX + (f"{head}.{last}" if head else last)


# --- finding the files ---------------------------------------------------------------

def hub_folder_of(path: str) -> Optional[str]:
    """The hub folder ``path`` names (the folder itself, or the folder of one of its weight
    files), or None when ``path`` is not in the hub layout."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        names = os.listdir(path)
        if CONFIG_NAME in names or any(n in names for n in WEIGHT_FILES + INDEX_FILES):
            return path
        return None
    folder, name = os.path.split(os.path.abspath(path))
    if name.endswith(".safetensors"):
        return folder
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)) and (
            name in WEIGHT_FILES or name.endswith(".index.json") or name.startswith("pytorch_model")):
        return folder
    return None


def _weight_files(folder: str, path: str):
    """The weight files to read: ``path`` itself when it is one, else the folder's shards or
    its single file (safetensors preferred)."""
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        if path.endswith(".index.json"):
            return _shards(folder, path)
        return [path]
    for index in INDEX_FILES:
        if os.path.isfile(os.path.join(folder, index)):
            return _shards(folder, os.path.join(folder, index))
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    raise FileNotFoundError(f"hub folder {folder} has no weights: expected {' or '.join(WEIGHT_FILES)} "
                            f"(or a sharded {' / '.join(INDEX_FILES)})")


def _shards(folder: str, index: str):
    with open(index) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map' of tensor names to shard files")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"{index} names the shard {name!r}; shards must be plain file names in {folder}")
        files.append(os.path.join(folder, name))
    return files


# --- config.json -----------------------------------------------------------------------

def read_config(folder: str) -> dict:
    """``config.json`` of a hub folder, checked to be an InternImage config."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: the hub layout needs it next to the weights "
                                "to know the architecture")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{path} has model_type {config.get('model_type')!r}, not {MODEL_TYPE!r}: "
                         "this is not an InternImage release")
    return config


def model_kwargs_from_config(config: dict, source: str = CONFIG_NAME) -> dict:
    """:class:`~internimage.InternImageClassifier` keyword arguments from a hub ``config.json``:
    the architecture as an ``arch`` dict (every setting stated), the rest as keywords.
    Keys the classifier does not know are logged and ignored."""
    missing = [k for k in ("channels", "depths", "groups") if k not in config]
    if missing:
        raise ValueError(f"{source} lacks {missing}: cannot tell the architecture")
    unknown = sorted(set(config) - set(MODEL_FIELDS) - set(HF_FIELDS))
    if unknown:
        print_log(f"{source}: ignoring keys that are not InternImage constructor arguments: {unknown}",
                  logger="current")
    arch = {k: config[k] for k in ARCH_FIELDS if k in config}
    kwargs = {k: config[k] for k in MODEL_FIELDS if k in config and k not in ARCH_FIELDS}
    return dict(arch=arch, **kwargs)


def config_from_model_kwargs(kwargs: dict, name: Optional[str] = None,
                             remote_code_repo: Optional[str] = REMOTE_CODE_REPO) -> dict:
    """The ``config.json`` of a classifier built with ``kwargs`` (``arch`` a variant name or
    dict, plus keywords), every constructor field stated as the official files do."""
    from ..models.backbone import resolve_arch

    kwargs = dict(kwargs)
    settings = resolve_arch(kwargs.pop("arch", None),
                            **{k: kwargs.pop(k) for k in ARCH_FIELDS if k in kwargs})
    defaults = dict(core_op="DCNv3", num_classes=1000, mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
                    drop_path_type="linear", act_layer="GELU", norm_layer="LN", layer_scale=None, cls_scale=1.5,
                    with_cp=False, use_clip_projector=False, remove_center=False)
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"cannot state {unknown} in a hub config.json: not InternImage classifier arguments")
    values = {**defaults, **kwargs, **settings}
    for key in ("depths", "groups", "level2_post_norm_block_ids"):
        if values[key] is not None:
            values[key] = [int(v) for v in values[key]]
    for key in ("mlp_ratio", "drop_rate", "drop_path_rate", "offset_scale", "cls_scale"):
        values[key] = float(values[key])
    if values["layer_scale"] is not None:
        values["layer_scale"] = float(values["layer_scale"])
    config = {}
    if name:
        config["_name_or_path"] = name
    config["architectures"] = ["InternImageModelForImageClassification"]
    if remote_code_repo:
        config["auto_map"] = {
            "AutoConfig": f"{remote_code_repo}--configuration_internimage.InternImageConfig",
            "AutoModel": f"{remote_code_repo}--modeling_internimage.InternImageModel",
            "AutoModelForImageClassification":
                f"{remote_code_repo}--modeling_internimage.InternImageModelForImageClassification"}
    config.update({k: values[k] for k in sorted(MODEL_FIELDS)})
    config["model_type"] = MODEL_TYPE
    config["torch_dtype"] = "float32"
    return dict(sorted(config.items()))


# --- preprocessor_config.json ----------------------------------------------------------

def _size_pair(value, what: str, source: str):
    """(height, width, keeps_aspect) of a CLIP processor size entry."""
    if isinstance(value, int):
        return value, value, True
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return value["shortest_edge"], value["shortest_edge"], True
        if "height" in value and "width" in value:
            return value["height"], value["width"], False
    raise ValueError(f"{source}: cannot read {what}={value!r} (expected an int, {{'shortest_edge': N}} "
                     "or {'height': H, 'width': W})")


def data_config_from_preprocessor(pre: dict, source: str = PREPROCESSOR_NAME) -> dict:
    """timm's data config (``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``,
    ``mean``, ``std``: what ``timm.data.create_transform`` takes) of a CLIP image processor.

    CLIP resizes the short side to ``size`` and centre-crops ``crop_size``: timm's
    ``crop_mode='center'`` with ``crop_pct = crop / size``; a ``size`` of height and width
    resizes to exactly that, timm's ``'squash'``."""
    if pre.get("do_rescale", True) and not math.isclose(pre.get("rescale_factor", 1 / 255), 1 / 255):
        raise ValueError(f"{source}: rescale_factor {pre['rescale_factor']} is not 1/255; not supported")
    resample = pre.get("resample", 3)
    if resample not in RESAMPLE:
        raise ValueError(f"{source}: resample={resample!r} is not one of {RESAMPLE} (PIL constants)")
    size_h, size_w, keep_aspect = _size_pair(pre.get("size", 224), "size", source)
    if pre.get("do_center_crop", True):
        crop_h, crop_w, _ = _size_pair(pre.get("crop_size", size_h), "crop_size", source)
    else:
        crop_h, crop_w = size_h, size_w
    if not pre.get("do_resize", True):
        raise ValueError(f"{source}: do_resize=false (the model needs a fixed input size); not supported")
    crop_mode, crop_pct = ("center" if keep_aspect else "squash"), crop_h / size_h
    from ..models.variants import IMAGENET_MEAN, IMAGENET_STD

    normalize = pre.get("do_normalize", True)
    return dict(input_size=(3, int(crop_h), int(crop_w)), interpolation=RESAMPLE[resample],
                mean=tuple(pre.get("image_mean", IMAGENET_MEAN)) if normalize else (0.0, 0.0, 0.0),
                std=tuple(pre.get("image_std", IMAGENET_STD)) if normalize else (1.0, 1.0, 1.0),
                crop_pct=crop_pct, crop_mode=crop_mode)


def preprocessor_from_data_config(data_config: dict) -> dict:
    """The CLIP image processor (``preprocessor_config.json``) of a timm data config."""
    _, height, width = data_config["input_size"]
    crop_pct = data_config.get("crop_pct", 1.0)
    mode = data_config.get("crop_mode", "center")
    resample = {v: k for k, v in RESAMPLE.items()}.get(data_config.get("interpolation", "bicubic"))
    if resample is None:
        raise ValueError(f"interpolation {data_config['interpolation']!r} has no CLIP processor equivalent; "
                         f"use one of {list(RESAMPLE.values())}")
    if mode == "squash":
        size = {"height": int(math.floor(height / crop_pct)), "width": int(math.floor(width / crop_pct))}
    elif mode == "center" and height == width:
        size = int(math.floor(height / crop_pct))  # timm's rule for the resize before the crop
    else:
        raise ValueError(f"crop_mode {mode!r} with input {height}x{width} has no CLIP processor equivalent")
    return {"crop_size": {"height": height, "width": width} if height != width else height,
            "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(data_config["mean"]),
            "image_std": list(data_config["std"]), "resample": resample, "size": size}


def read_data_config(folder: str) -> Optional[dict]:
    """The timm data config of a hub folder's ``preprocessor_config.json`` (None without one)."""
    path = os.path.join(folder, PREPROCESSOR_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return data_config_from_preprocessor(json.load(f), source=path)


# --- weights ---------------------------------------------------------------------------

def _read_weights(path: str, map_location="cpu") -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"hub weight file {path} not found")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            weights = load_safetensors(path, device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    else:
        from .loading import to_state_dict, torch_load_safe

        weights = to_state_dict(torch_load_safe(path, "cpu"))
    if map_location not in (None, "cpu", torch.device("cpu")):
        weights = {k: v.to(map_location) for k, v in weights.items()}
    return weights


def load_hub_state_dict(path: str, map_location="cpu") -> "OrderedDict[str, torch.Tensor]":
    """The official-key state dict of a hub folder or weights file (shards merged)."""
    folder = hub_folder_of(path)
    if folder is None:
        raise ValueError(f"{path} is not in the Hugging Face hub layout (a folder with {CONFIG_NAME} and "
                         f"{' or '.join(WEIGHT_FILES)}, or such a weights file)")
    state_dict = OrderedDict()
    for file in _weight_files(folder, path):
        weights = _read_weights(file, map_location)
        foreign = [k for k in weights if not k.startswith(KEY_PREFIX)]
        if foreign:
            raise ValueError(f"{file} is not an InternImage hub weights file: its keys should start with "
                             f"{KEY_PREFIX!r}, found {foreign[:3]}")
        for key, value in weights.items():
            state_dict[hub_to_official_key(key)] = value
    return state_dict


def _check_config_fits(kwargs: dict, state_dict: Dict[str, torch.Tensor], source: str):
    """Raise ``ValueError`` naming the first differences when the classifier that ``kwargs``
    describe does not have exactly the weights' keys and shapes (built on the meta device:
    no memory, a fraction of a second even for G); return the model's keys in order."""
    from ..models.classifier import InternImageClassifier

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in InternImageClassifier(**kwargs).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: config gives {expected[k]}, weights have {found[k]}" for k in expected
              if k in found and expected[k] != found[k]]
    if missing or unexpected or shapes:
        problems = []
        if shapes:
            problems.append(f"{len(shapes)} shapes differ ({'; '.join(shapes[:3])})")
        if missing:
            problems.append(f"{len(missing)} weights missing ({', '.join(missing[:3])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected weights ({', '.join(unexpected[:3])})")
        raise ValueError(f"{source}: the architecture in {CONFIG_NAME} does not match the weights: "
                         + "; ".join(problems))
    return list(expected)


def load_hub_checkpoint(path: str, map_location="cpu") -> dict:
    """A hub folder (or its weights file) as a checkpoint of this project: ``{'state_dict':
    official keys, 'meta': {'hub_config', 'model_kwargs', 'data_config'}}``, after checking
    that ``config.json`` describes exactly these weights (a weights file without a
    ``config.json`` next to it is read as it is)."""
    folder = hub_folder_of(path)
    state_dict = load_hub_state_dict(path, map_location)
    meta = dict(hub_folder=folder)
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        config = read_config(folder)
        kwargs = model_kwargs_from_config(config, source=os.path.join(folder, CONFIG_NAME))
        # In the model's order (safetensors files store keys sorted), as the official files have it.
        state_dict = OrderedDict((k, state_dict[k]) for k in _check_config_fits(kwargs, state_dict, source=path))
        meta.update(hub_config=config, model_kwargs=kwargs, data_config=read_data_config(folder))
    return dict(state_dict=state_dict, meta=meta)


def from_pretrained(path: str, map_location="cpu", **overrides):
    """An :class:`~internimage.InternImageClassifier` from a hub folder (or its weights file
    next to its ``config.json``), in eval mode, with the official weights.

    The architecture comes from ``config.json`` (checked against the weights); ``overrides``
    change settings that leave the weights' shapes alone (``core_op='DCNv3_pytorch'``,
    ``with_cp=True``, ``drop_path_rate=0.1`` for fine-tuning). The preprocessing of
    ``preprocessor_config.json`` is attached as ``model.pretrained_cfg`` (timm's data
    config keys), for ``timm.data.create_transform(**model.pretrained_cfg)``.
    """
    from ..models.classifier import InternImageClassifier
    from .loading import load_state_dict_checked

    checkpoint = load_hub_checkpoint(path, map_location)
    meta = checkpoint["meta"]
    if "model_kwargs" not in meta:
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} next to the weights, so the architecture is unknown; "
                                "build the model yourself and load the file with load_classifier_weights")
    kwargs = dict(meta["model_kwargs"])
    for key, value in overrides.items():
        if key in ARCH_FIELDS:
            kwargs["arch"] = dict(kwargs["arch"], **{key: value})
        else:
            kwargs[key] = value
    model = InternImageClassifier(**kwargs)
    # Built in the weights' precision (float32 for the releases), so that they load unchanged.
    dtypes = {v.dtype for v in checkpoint["state_dict"].values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    load_state_dict_checked(model, checkpoint["state_dict"], source=path, min_fraction=1.0)
    model.pretrained_cfg = dict(meta["data_config"] or {})
    return model.to(map_location).eval()


def infer_model_kwargs(state_dict: Dict[str, torch.Tensor], source: str = "checkpoint",
                       variant: Optional[str] = None):
    """The classifier keyword arguments and the release whose preprocessing applies, for an
    official-key classifier ``state_dict`` of one of the released variants (``variant``, or
    recognised by its width and depths; layer scale and class count read off the weights)."""
    from ..models.variants import (
        ARCH_SETTINGS,
        BACKBONE_PRETRAINED,
        DEFAULT_PRETRAINED,
        PRETRAINED_CFGS,
        classifier_config,
        variant_name,
    )

    if "patch_embed.conv1.weight" not in state_dict or not any(k.startswith(("head.", "conv_head.", "fc_norm."))
                                                                 for k in state_dict):
        raise ValueError(f"{source} is not an InternImage classifier (no stem or no classification head): "
                         "the hub layout holds classifiers")
    if variant is not None:
        variant = variant_name(variant)
    else:
        channels = 2 * state_dict["patch_embed.conv1.weight"].shape[0]
        depths = [len({k.split(".")[3] for k in state_dict if k.startswith(f"levels.{i}.blocks.")}) for i in range(4)]
        variants = [k for k, a in ARCH_SETTINGS.items() if a["channels"] == channels and a["depths"] == depths]
        if not variants:
            raise ValueError(f"{source}: channels {channels} and depths {depths} are not a released variant; "
                             "state the architecture (--model-config) to write it")
        variant = variants[0]
    head = state_dict.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None else 0
    release = DEFAULT_PRETRAINED[variant] if num_classes != PRETRAINED_CFGS[
        BACKBONE_PRETRAINED[variant]]["num_classes"] else BACKBONE_PRETRAINED[variant]
    layer_scale = None
    if any(k.endswith(".gamma1") for k in state_dict):
        layer_scale = PRETRAINED_CFGS[release]["layer_scale"] or 1.0  # the value only initialises
    kwargs = classifier_config(variant, num_classes=num_classes, layer_scale=layer_scale, drop_path_rate=0.0)
    return kwargs, release


def save_hub_folder(out_dir: str, state_dict: Dict[str, torch.Tensor], model_kwargs: dict,
                    data_config: Optional[dict] = None, weights: str = "safetensors", name: Optional[str] = None,
                    remote_code_repo: Optional[str] = REMOTE_CODE_REPO) -> dict:
    """Write a classifier's official-key ``state_dict`` in the hub layout (``config.json``,
    ``preprocessor_config.json`` when ``data_config`` is given, ``model.safetensors`` or
    ``pytorch_model.bin``), after checking that ``model_kwargs`` describe the weights.
    Files are written atomically; returns the config written."""
    from ..engine.fileio import atomic_write
    from .loading import save_atomic

    if weights not in ("safetensors", "bin"):
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    _check_config_fits(model_kwargs, state_dict, source="the weights to write")
    config = config_from_model_kwargs(model_kwargs, name=name, remote_code_repo=remote_code_repo)
    os.makedirs(out_dir, exist_ok=True)
    hub_weights = OrderedDict((official_to_hub_key(k), v.detach().cpu().contiguous()) for k, v in state_dict.items())
    if weights == "safetensors":
        from safetensors.torch import save

        atomic_write(save(hub_weights, metadata={"format": "pt"}), os.path.join(out_dir, SAFETENSORS_NAME))
    else:
        save_atomic(hub_weights, os.path.join(out_dir, PICKLE_NAME))
    atomic_write(json.dumps(config, indent=2) + "\n", os.path.join(out_dir, CONFIG_NAME))
    if data_config is not None:
        pre = preprocessor_from_data_config(data_config)
        atomic_write(json.dumps(pre, indent=2) + "\n", os.path.join(out_dir, PREPROCESSOR_NAME))
    return config
