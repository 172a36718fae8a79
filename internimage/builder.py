"""``build_model``: an InternImage classifier by variant name, optionally with weights."""
from typing import Optional

from .checkpoint import load_classifier_weights
from .models import InternImageClassifier
from .variants import VARIANTS, variant_name


def build_model(name: str, num_classes: int = 1000, pretrained: Optional[str] = None,
                **overrides) -> InternImageClassifier:
    """Build ``internimage_t|s|b|l|xl|h|g`` (see :data:`internimage.variants.VARIANTS`).

    Args:
        name: variant name, e.g. ``'internimage_t'`` (or just ``'t'``).
        num_classes: classes of the linear head.
        pretrained: path or URL of a checkpoint in any supported format; a head with
            another number of classes is skipped (with a log line).
        **overrides: any other :class:`InternImageClassifier` argument
            (e.g. ``drop_path_rate=0.0``, ``core_op='DCNv3_pytorch'``, ``with_cp=True``).
    """
    cfg = dict(VARIANTS[variant_name(name)])
    cfg.update(overrides)
    model = InternImageClassifier(num_classes=num_classes, **cfg)
    if pretrained:
        load_classifier_weights(model, pretrained)
    return model
