"""``type='InternImage'`` for OpenMMLab configs, without importing mmdet or mmseg.

InternImage is registered in mmengine's root ``MODELS``; mmdet's and mmseg's ``MODELS`` are
its children and search their ancestors for a type they do not hold, so
``backbone=dict(type='InternImage', ...)`` builds in either, as ``mmdet::`` / ``mmseg::``
scoped configs expect.
"""
from mmengine.registry import MODELS

from .models import InternImage, InternImageClassifier


def register_all():
    """Register the models in mmengine's root ``MODELS`` (idempotent)."""
    for name, module in (("InternImage", InternImage), ("InternImageClassifier", InternImageClassifier)):
        if MODELS.module_dict.get(name) is not module:
            MODELS.register_module(name=name, module=module, force=True)


register_all()
