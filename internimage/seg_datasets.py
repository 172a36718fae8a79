"""ADE20K with input checks, for mmseg 1.x (registered by ``import internimage``).

* ``CheckedADE20KDataset``: ``ADE20KDataset`` that names the missing folder when the data
  root lacks the ADE20K layout, instead of failing later with an empty dataset.
* ``CheckSegLabels``: a pipeline step after ``LoadAnnotations`` that rejects label maps
  with values outside ``[0, num_classes)`` other than the ignore index, naming the file
  and the values, instead of training on them silently.
"""
import os

import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.datasets import ADE20KDataset
from mmseg.registry import DATASETS, TRANSFORMS


@DATASETS.register_module()
class CheckedADE20KDataset(ADE20KDataset):
    def load_data_list(self):
        for key in ("img_path", "seg_map_path"):
            folder = self.data_prefix.get(key)
            if folder and not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"ADE20K layout not found: {folder} does not exist (expected <data_root>/images/training, "
                    "images/validation, annotations/training and annotations/validation)")
        data_list = super().load_data_list()
        if not data_list:
            raise FileNotFoundError(f"no '{self.img_suffix}' image found in {self.data_prefix.get('img_path')}")
        return data_list


@TRANSFORMS.register_module()
class CheckSegLabels(BaseTransform):
    """Raise ``ValueError`` for label values outside ``[0, num_classes)`` and ``ignore_index``."""

    def __init__(self, num_classes: int = 150, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def transform(self, results: dict) -> dict:
        labels = results.get("gt_seg_map")
        if labels is not None:
            values = np.unique(labels)
            bad = values[((values < 0) | (values >= self.num_classes)) & (values != self.ignore_index)]
            if bad.size:
                raise ValueError(f"label map {results.get('seg_map_path')} has values {bad.tolist()[:10]} outside "
                                 f"[0, {self.num_classes}) that are not the ignore index {self.ignore_index}"
                                 + (" (after reduce_zero_label)" if results.get("reduce_zero_label") else ""))
        return results

    def __repr__(self):
        return f"{self.__class__.__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index})"
