"""``type='InternImage'`` for OpenMMLab configs, without importing mmdet or mmseg.

InternImage is registered in mmengine's root ``MODELS``; mmdet's and mmseg's ``MODELS`` are
its children and search their ancestors for an unscoped type they do not hold, so
``backbone=dict(type='InternImage', ...)`` builds in either. A scoped name
(``type='mmdet.InternImage'``) is looked up in that registry alone, so the models are also
registered in mmdet's / mmseg's ``MODELS`` once that library is imported: here when it
already is, and by ``import internimage.datasets`` (which configs name) otherwise.

``InternImageClsBackbone`` (the classifier as the backbone of mmpretrain's
``ImageClassifier``, :mod:`internimage.models.mmpretrain_wrapper`) is registered the same
way, in mmpretrain's ``MODELS`` too.
"""
import sys

from mmengine.registry import MODELS

from .models import InternImage, InternImageClassifier
from .models.mmpretrain_wrapper import InternImageClsBackbone


def register_all():
    """Register the models in mmengine's root ``MODELS`` and in mmdet's / mmseg's /
    mmpretrain's ``MODELS`` when those are imported (idempotent; never imports them)."""
    registries = [MODELS]
    for scope in ("mmdet", "mmseg", "mmpretrain"):
        if f"{scope}.registry" in sys.modules:
            registries.append(sys.modules[f"{scope}.registry"].MODELS)
    for registry in registries:
        for name, module in (("InternImage", InternImage), ("InternImageClassifier", InternImageClassifier),
                             ("InternImageClsBackbone", InternImageClsBackbone)):
            if registry.module_dict.get(name) is not module:
                registry.register_module(name=name, module=module, force=True)


register_all()
