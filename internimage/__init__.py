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
import os as _os
import sys as _sys


def _deepspeed_cpu_without_gpu():
    """DeepSpeed (optional; mmengine.runner imports it when installed) logs "Setting
    accelerator to CPU" on stdout when it finds no GPU, which broke the tools' JSON output.
    On a machine without a GPU, tell it the CPU directly (what its detection picks anyway)."""
    if "DS_ACCELERATOR" in _os.environ or "deepspeed" in _sys.modules:
        return
    import torch

    if not torch.cuda.is_available():
        _os.environ["DS_ACCELERATOR"] = "cpu"


_deepspeed_cpu_without_gpu()

from .checkpoint import load_backbone_weights, load_classifier_weights, to_state_dict  # noqa: E402
from .checkpoint.hub import from_pretrained  # noqa: E402
from .models import VARIANTS, InternImage, InternImageClassifier, build_model  # noqa: E402
from .models.variants import scaled_variant  # noqa: E402
from .registry import register_all  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ["InternImage", "InternImageClassifier", "build_model", "from_pretrained", "scaled_variant",
           "load_backbone_weights", "load_classifier_weights", "to_state_dict", "VARIANTS", "register_all",
           "__version__"]
