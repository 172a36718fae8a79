from . import timm_models  # noqa: F401  (registers the released classifiers with timm)
from .backbone import InternImage
from .builder import build_model
from .classifier import InternImageClassifier
from .variants import ARCH_SETTINGS, PRETRAINED_CFGS, VARIANTS, scaled_variant

__all__ = ["InternImage", "InternImageClassifier", "build_model", "ARCH_SETTINGS", "PRETRAINED_CFGS", "VARIANTS",
           "scaled_variant"]
