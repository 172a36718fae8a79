"""InternImage backbones and classifiers on the DCNv3 operator, for OpenMMLab 2.0.

``import internimage`` gives the models (``InternImage``, ``InternImageClassifier``,
``build_model``, ``from_pretrained`` for a Hugging Face hub folder), registers
``type='InternImage'`` in mmengine's root model registry (so mmdet and mmseg configs find
it) and makes checkpoint loading safe: mmengine's checkpoints load under
``torch.load(weights_only=True)``, and its http(s) loader, which unpickles downloads with
``weights_only=False``, is replaced by a safe one (see :mod:`internimage.checkpoint`). It
imports neither mmdet nor mmseg. Training configs also name ``internimage.engine`` (hooks,
optimizer constructor, atomic checkpoint files) and ``internimage.datasets`` (checked
COCO / ADE20K datasets) in ``custom_imports``.
"""
from .checkpoint import load_backbone_weights, load_classifier_weights, to_state_dict
from .checkpoint.hub import from_pretrained
from .models import VARIANTS, InternImage, InternImageClassifier, build_model
from .models.variants import scaled_variant
from .registry import register_all
from .version import __version__

__all__ = ["InternImage", "InternImageClassifier", "build_model", "from_pretrained", "scaled_variant",
           "load_backbone_weights", "load_classifier_weights", "to_state_dict", "VARIANTS", "register_all",
           "__version__"]
