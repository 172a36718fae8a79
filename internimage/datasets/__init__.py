"""Checked datasets and transforms, registered in mmdet's / mmseg's registries (each only
where that library is installed), and synthetic data for tests and the quickstart.

COCO (mmdet): ``CheckedCocoDataset``, ``CheckedLoadImageFromFile``.
ADE20K (mmseg): ``CheckedADE20KDataset``, ``CheckSegLabels``.
ImageNet (mmpretrain): ``CheckedImageNet``, ``ClassCountCheckHook`` (and
``CheckedLoadImageFromFile`` in mmpretrain's transforms).
Configs name this package in ``custom_imports``.
"""
import importlib.util

if importlib.util.find_spec("mmdet") is not None:
    from . import coco  # noqa: F401
if importlib.util.find_spec("mmseg") is not None:
    from . import ade20k  # noqa: F401
if importlib.util.find_spec("mmpretrain") is not None and importlib.util.find_spec("mmdet") is not None:
    from . import imagenet  # noqa: F401  (reuses the COCO checks' image loader)

from ..registry import register_all  # noqa: E402

register_all()  # scoped names (type='mmdet.InternImage') now that mmdet / mmseg / mmpretrain are imported
