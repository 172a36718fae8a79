"""``build_model``: an InternImage classifier by variant name, optionally with weights."""
from typing import Union

from ..checkpoint import load_classifier_weights
from .classifier import InternImageClassifier
from .variants import classifier_config, pretrained_url


def build_model(name: str, num_classes: int = 1000, pretrained: Union[str, bool, None] = None,
                **overrides) -> InternImageClassifier:
    """Build ``internimage_t|s|b|l|xl|h|g`` with the drop path and layer scale of its ImageNet-1k
    release (see :data:`internimage.models.variants.PRETRAINED_CFGS`).

    Args:
        name: variant name, e.g. ``'internimage_t'`` (or just ``'t'``).
        num_classes: classes of the linear head.
        pretrained: path or URL of a checkpoint in any supported format, or ``True`` for the
            variant's official ImageNet-1k release; a head with another number of classes
            is skipped (with a log line).
        **overrides: any other :class:`InternImageClassifier` argument
            (e.g. ``drop_path_rate=0.0``, ``core_op='DCNv3_pytorch'``, ``with_cp=True``).
    """
    model = InternImageClassifier(num_classes=num_classes, **classifier_config(name, **overrides))
    if pretrained:
        load_classifier_weights(model, pretrained_url(name) if pretrained is True else pretrained)
    return model
