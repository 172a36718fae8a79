"""Register InternImage into the OpenMMLab model registries that are installed."""
import importlib.util

from .models import InternImage


def register_all():
    """Add ``type='InternImage'`` to mmdet's and mmseg's MODELS (each only if installed)."""
    for scope in ("mmdet", "mmseg"):
        try:
            registry = __import__(f"{scope}.registry", fromlist=["MODELS"]).MODELS
        except ImportError:
            continue
        if registry.module_dict.get("InternImage") is not InternImage:
            registry.register_module(name="InternImage", module=InternImage, force=True)


register_all()

if importlib.util.find_spec("mmdet") is not None:  # COCO dataset checks
    from . import det_datasets  # noqa: F401
if importlib.util.find_spec("mmseg") is not None:  # ADE20K dataset checks
    from . import seg_datasets  # noqa: F401
