from .backbone import InternImage
from .classifier import InternImageClassifier

__all__ = ["InternImage", "InternImageClassifier"]
