from .backbone import InternImage
from .builder import build_model
from .classifier import InternImageClassifier
from .variants import ARCH_SETTINGS, PRETRAINED_CFGS, VARIANTS

__all__ = ["InternImage", "InternImageClassifier", "build_model", "ARCH_SETTINGS", "PRETRAINED_CFGS", "VARIANTS"]
