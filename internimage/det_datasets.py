"""COCO with input checks, for mmdet 3.x (registered by ``import internimage``).

``CheckedCocoDataset`` is mmdet's ``CocoDataset`` that fails at build time, with the file
or id named, where ``CocoDataset`` would fail deep inside a training run or silently
drop data:

* the annotation file does not exist (``CocoDataset``: an ``open`` error from pycocotools);
* an annotation refers to an image id that the file does not list (pycocotools indexes it
  under that id and mmdet never reads it: the object is lost without a word), or to a
  category the file does not list (a ``KeyError`` in mmdet);
* an image file is missing (``CocoDataset``: the first time the loader reaches it, possibly
  hours into training).

File checks apply to local files read without ``backend_args`` (a storage backend may map
local-looking paths elsewhere); ``check_files=False`` turns them off, e.g. for very large
datasets on slow network file systems.
"""
import os

from mmdet.datasets import CocoDataset
from mmdet.datasets.api_wrappers import COCO
from mmdet.registry import DATASETS


class _CheckedCOCO(COCO):
    def createIndex(self, *args, **kwargs):  # noqa: N802 (pycocotools' name)
        data = self.dataset
        image_ids = {image["id"] for image in data.get("images", [])}
        category_ids = {category["id"] for category in data.get("categories", [])}
        for ann in data.get("annotations", []):
            if ann.get("image_id") not in image_ids:
                raise ValueError(f"annotation id {ann.get('id')} refers to image id {ann.get('image_id')}, "
                                 "which is not in the file's 'images'")
            if category_ids and ann.get("category_id") not in category_ids:
                raise ValueError(f"annotation id {ann.get('id')} has category_id {ann.get('category_id')}, "
                                 f"which is not in the file's 'categories' {sorted(category_ids)}")
        return super().createIndex(*args, **kwargs)


def _is_local(path: str) -> bool:
    return "://" not in str(path)


@DATASETS.register_module()
class CheckedCocoDataset(CocoDataset):
    COCOAPI = _CheckedCOCO

    def __init__(self, *args, check_files: bool = True, **kwargs):
        self.check_files = check_files
        super().__init__(*args, **kwargs)

    def _checks_file(self, path) -> bool:
        return self.check_files and self.backend_args is None and _is_local(path)

    def load_data_list(self):
        if self._checks_file(self.ann_file) and not os.path.isfile(self.ann_file):
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_file} "
                                    f"(data_root={self.data_root!r}, ann_file is taken relative to it)")
        try:
            data_list = super().load_data_list()
        except ValueError as error:
            raise ValueError(f"{self.ann_file}: {error}") from error
        missing = [info["img_path"] for info in data_list
                   if self._checks_file(info["img_path"]) and not os.path.isfile(info["img_path"])]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FileNotFoundError(f"{len(missing)} image(s) listed in {self.ann_file} not found: {shown} "
                                    f"(data_prefix={self.data_prefix})")
        return data_list
