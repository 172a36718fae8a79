"""The model an export starts from: a variant (+ checkpoint) or a config (+ checkpoint).

Every exported graph takes one normalised NCHW float image batch (what the data
preprocessor of a config, or timm's transform of a classifier, produces) and returns:

* a classifier: ``logits`` ``(N, classes)``;
* ``features=True``: the backbone's stage outputs ``feat0..feat3`` (NCHW; after the neck
  for a config that has one, e.g. the FPN of a detector);
* an mmseg segmentor: ``seg_logits`` ``(N, classes, H, W)`` at the input resolution (the
  ``test_cfg.mode='whole'`` inference of ``EncoderDecoder.encode_decode``; sliding-window
  inference is a loop over crops outside the graph).

Detectors export only with ``features=True``: mmdet 3.x has no export path of its own
(that is mmdeploy's job), and its RPN/RoI heads produce data-dependent numbers of boxes
(NMS, per-image proposal lists, Python loops over the batch) that ``torch.export`` cannot
capture as one static graph.
"""
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.logging import print_log
from torch import nn

from ops_dcnv3 import DCNv3

from ..checkpoint import backbone_state_dict, load_file, load_state_dict_checked, to_state_dict
from ..models import InternImage, InternImageClassifier
from ..models.variants import DEFAULT_PRETRAINED, PRETRAINED_CFGS, classifier_config, variant_name

__all__ = ["ExportTarget", "build_from_variant", "build_from_config", "randomize_sampling"]


@dataclass
class ExportTarget:
    """A model ready to export: ``module(image) -> tensor or tuple of tensors``, in eval mode.

    ``output_names`` is ``None`` for features (``feat0..``, as many as the model returns) and
    ``input_size`` the (H, W) the model was trained or released at (the default ``--shape``).
    """

    module: nn.Module
    input_size: Tuple[int, int]
    output_names: Optional[List[str]]
    description: str


class Features(nn.Module):
    """Multi-level features as a tuple (named outputs ``feat0..``): the backbone's for an
    InternImage model (a classifier's without its head), ``extract_feat`` (backbone + neck)
    for an mmseg / mmdet model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        if isinstance(self.model, InternImage):
            return tuple(InternImage.forward(self.model, x))
        return tuple(self.model.extract_feat(x))


class SegmentorLogits(nn.Module):
    """An mmseg ``EncoderDecoder`` as image -> per-pixel class logits at the input resolution."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, x):
        # encode_decode reads only the first image's meta: the batch shares one size.
        return self.segmentor.encode_decode(x, [dict(img_shape=tuple(x.shape[2:]))])


def _log(message: str, level=logging.INFO):
    print_log(message, logger="current", level=level)


def randomize_sampling(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every DCNv3 layer random offset and mask projections, in place.

    A freshly initialised DCNv3 has zero offset and mask projections (SPEC section 4): it
    samples exactly at pixel centres with uniform weights, where bilinear interpolation is
    trivial, so a parity check on such a model would not test the sampling. Offsets of a
    few pixels make the locations fractional and push some outside the image.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DCNv3):
                std = module.channels ** -0.5
                for linear, bias_range in ((module.offset, 2.0), (module.mask, 1.0)):
                    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)
                    linear.bias.copy_((torch.rand(linear.bias.shape, generator=generator) * 2 - 1) * bias_range)
    return model


def _random_weights(model: nn.Module, name: str) -> None:
    _log(f"No checkpoint given: exporting a randomly initialised {name} (for trying the export only), with "
         "random DCNv3 offset/mask projections so that --verify exercises the deformable sampling",
         logging.WARNING)
    randomize_sampling(model)


def _layer_scale_of(state_dict: Dict[str, torch.Tensor]) -> Optional[float]:
    """1.0 when the weights carry layer-scale gammas (their values then overwrite it), else None:
    the model then has exactly the checkpoint's parameters, whatever its release table says."""
    return 1.0 if any(k.rsplit(".", 1)[-1] in ("gamma1", "gamma2") for k in state_dict) else None


def _load_complete(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str,
                   unused_prefixes: Tuple[str, ...] = ()) -> None:
    """Load like training does (shape mismatches raise, naming the weight), but refuse missing
    weights: in an exported file they would be random numbers nobody sees. Weights under
    ``unused_prefixes`` (modules inference never runs) may be missing."""
    result = load_state_dict_checked(model, state_dict, source=source)
    missing = [k for k in result.missing_keys if not k.startswith(unused_prefixes)]
    if missing:
        raise ValueError(f"checkpoint {source} lacks {len(missing)} weights of the model, e.g. {missing[:5]}; "
                         "exporting would bake random values into the file. Check the variant / config "
                         "matches the checkpoint")


def _release_input_size(variant: str) -> Tuple[int, int]:
    size = PRETRAINED_CFGS[DEFAULT_PRETRAINED[variant]]["input_size"]
    return size, size


def build_from_variant(variant: str, checkpoint: Optional[str] = None, features: bool = False) -> ExportTarget:
    """InternImage-``variant`` as a classifier, or its backbone with ``features=True``.

    The checkpoint (any supported format, path or URL) decides the number of classes and
    whether the blocks have layer scale; a file whose shapes do not fit the variant raises
    ``ValueError`` naming the first mismatching weight. Without a checkpoint the model is
    randomly initialised (fine for trying the export, said in the log).
    """
    key = variant_name(variant)  # KeyError naming the variants for an unknown one
    name = f"InternImage-{key.upper()}"
    state_dict = None
    if checkpoint is not None:
        state_dict = to_state_dict(load_file(checkpoint))
    if features:
        if state_dict is not None:
            state_dict = backbone_state_dict(state_dict)
        layer_scale = _layer_scale_of(state_dict) if state_dict is not None else None
        model = InternImage(arch=key, layer_scale=layer_scale, drop_path_rate=0.0)
        module, outputs, description = Features(model), None, f"{name} backbone features"
    else:
        overrides = dict(drop_path_rate=0.0)
        num_classes = 1000
        if state_dict is not None:
            if any(k.startswith("backbone.") for k in state_dict):
                raise ValueError(f"checkpoint {checkpoint} holds a detector or segmentor (its weights are under "
                                 "'backbone.'), not a classifier: export its backbone with --features, or export "
                                 "the whole model from its config (tools/export.py CONFIG CHECKPOINT)")
            overrides["layer_scale"] = _layer_scale_of(state_dict)
            head = state_dict.get("head.weight")
            num_classes = int(head.shape[0]) if head is not None and head.dim() == 2 else num_classes
        model = InternImageClassifier(num_classes=num_classes, **classifier_config(key, **overrides))
        outputs = ["logits"]
        module, description = model, f"{name} classifier ({num_classes} classes)"
    if state_dict is not None:
        _log(f"Loading {checkpoint} into the {description}")
        _load_complete(model, state_dict, checkpoint)
    else:
        _random_weights(model, description)
    return ExportTarget(module.eval(), _release_input_size(key), outputs, description)


def _config_input_size(cfg) -> Optional[Tuple[int, int]]:
    size = cfg.model.get("data_preprocessor", {}).get("size") or cfg.get("crop_size")
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _build_config_model(cfg) -> nn.Module:
    from mmengine.registry import MODELS, init_default_scope

    from ..engine.runner_utils import replace_sync_bn_with_bn

    replace_sync_bn_with_bn(cfg)  # SyncBN in eval mode is BN with the same parameters
    if cfg.get("default_scope"):
        init_default_scope(cfg.default_scope)
    model_cfg = cfg.model.copy()
    # The export loads its own checkpoint; nothing to fetch at build time.
    model_cfg.pop("pretrained", None)
    if isinstance(model_cfg.get("backbone"), dict):
        model_cfg.backbone.pop("init_cfg", None)
        model_cfg.backbone.pop("pretrained", None)
    return MODELS.build(model_cfg)


class ClassifierLogits(nn.Module):
    """The class scores of mmpretrain's ``ImageClassifier`` whose backbone is the whole
    InternImage classifier (``InternImageClsBackbone``, the classification configs): its
    layer-less ``ClsHead`` passes them through, so the backbone is the graph."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.backbone = classifier.backbone

    def forward(self, x):
        return self.backbone(x)[0]


def _pipeline_input_size(cfg) -> Optional[Tuple[int, int]]:
    """The image size the test pipeline ends with (its last crop or fixed resize)."""
    pipeline = (cfg.get("test_dataloader") or {}).get("dataset", {}).get("pipeline") or []
    for transform in reversed(pipeline):
        size = transform.get("crop_size") or (transform.get("scale") if transform.get("type") == "Resize" else None)
        if size is not None:
            return (int(size), int(size)) if isinstance(size, int) else (int(size[1]), int(size[0]))
    return None


def _kind(model: nn.Module) -> str:
    from ..models.mmpretrain_wrapper import InternImageClsBackbone

    if isinstance(model, (InternImageClassifier, InternImage)):
        return "classifier" if isinstance(model, InternImageClassifier) else "backbone"
    if isinstance(getattr(model, "backbone", None), InternImageClsBackbone) and \
            getattr(model, "neck", None) is None and type(getattr(model, "head", None)).__name__ == "ClsHead":
        return "mmpretrain_classifier"
    names = [cls.__module__ + "." + cls.__name__ for cls in type(model).__mro__]
    if any(n.startswith("mmseg.") and n.endswith(".EncoderDecoder") for n in names):
        return "segmentor"
    if any(n.startswith("mmdet.") and n.endswith(".BaseDetector") for n in names):
        return "detector"
    return "unknown"


def build_from_config(config: str, checkpoint: Optional[str] = None, features: bool = False,
                      cfg_options: Optional[dict] = None) -> ExportTarget:
    """The model of an mmseg / mmdet / classification config, loaded from ``checkpoint``.

    Supported: mmseg ``EncoderDecoder`` segmentors (UperNet), the classification configs
    (mmpretrain ``ImageClassifier`` over ``InternImageClsBackbone``; official release files
    load unchanged), ``InternImageClassifier`` and ``InternImage`` models, and with
    ``features=True`` any of these and mmdet detectors (backbone + neck). Anything else
    raises ``ValueError`` saying why.
    """
    from mmengine.config import Config

    if not os.path.isfile(config):
        raise FileNotFoundError(f"config {config} not found")
    cfg = Config.fromfile(config)  # imports the config's custom_imports (registers InternImage)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if "model" not in cfg:
        raise ValueError(f"config {config} defines no model")
    model = _build_config_model(cfg)
    kind = _kind(model)
    name = f"{type(model).__name__} of {os.path.basename(config)}"
    if kind == "detector" and not features:
        raise ValueError(f"{name} is an mmdet detector, which cannot be exported as one graph: its RPN and RoI "
                         "heads return a data-dependent number of boxes (NMS, per-image proposal lists, Python "
                         "loops over the batch) and mmdet 3.x has no export path of its own (mmdeploy's). "
                         "Export its backbone and neck with --features and run the heads in PyTorch")
    if kind == "unknown":
        raise ValueError(f"{name}: don't know how to export a {type(model).__name__}; supported are mmseg "
                         "EncoderDecoder segmentors, the classification configs, InternImageClassifier / "
                         "InternImage models and, with --features, mmdet detectors (backbone + neck)")
    if checkpoint is not None:
        _log(f"Loading {checkpoint} into the {name}")
        # The auxiliary head of a segmentor only trains; a released file may leave it out.
        state_dict = to_state_dict(load_file(checkpoint))
        if kind == "mmpretrain_classifier":  # an official release ({'model': sd}) has no 'backbone.' prefix
            from ..models.mmpretrain_wrapper import to_image_classifier_keys

            state_dict = to_image_classifier_keys(state_dict)
        _load_complete(model, state_dict, checkpoint, unused_prefixes=("auxiliary_head.",))
    else:
        _random_weights(model, name)
    if features or kind == "backbone":
        module, outputs, description = Features(model), None, f"features of the {name}"
    elif kind == "segmentor":
        module, outputs, description = SegmentorLogits(model), ["seg_logits"], f"the {name} (whole-image logits)"
    elif kind == "mmpretrain_classifier":
        module, outputs, description = ClassifierLogits(model), ["logits"], f"the {name} (class scores)"
    else:
        module, outputs, description = model, ["logits"], f"the {name}"
    size = _config_input_size(cfg) or _pipeline_input_size(cfg) or (224, 224)
    return ExportTarget(module.eval(), size, outputs, description)
