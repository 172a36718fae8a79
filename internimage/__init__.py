"""InternImage backbones and classifiers on the DCNv3 operator, for OpenMMLab 2.0.

``import internimage`` registers ``type='InternImage'`` in the mmdet and mmseg model
registries (when installed), makes mmengine checkpoints loadable under
``torch.load(weights_only=True)``, and replaces mmengine's http(s) checkpoint loader (which
unpickles downloads with ``weights_only=False``) by a safe one: see :mod:`internimage.checkpoint`.
"""
from . import (  # noqa: F401  (atomic checkpoint writes; reliability hooks)
           fileio,
           hooks,
           optim,  # noqa: F401  (registers the layer-decay optimizer constructor)
           safe_load,  # noqa: F401  (first: every later load relies on it)
)
from .builder import build_model
from .checkpoint import load_backbone_weights, load_classifier_weights, to_state_dict
from .models import InternImage, InternImageClassifier
from .registry import register_all
from .variants import VARIANTS
from .version import __version__

__all__ = ["InternImage", "InternImageClassifier", "build_model", "load_backbone_weights",
           "load_classifier_weights", "to_state_dict", "VARIANTS", "register_all", "__version__"]
