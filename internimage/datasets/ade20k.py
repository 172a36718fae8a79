"""ADE20K with input checks, for mmseg 1.x (registered by ``import internimage.datasets``).

* ``CheckedADE20KDataset``: ``ADE20KDataset`` that names the missing folder when the data
  root lacks the ADE20K layout, instead of failing later with an empty dataset. When it is
  built it also rejects, naming them, images without a label map, label maps that are
  missing and empty (0 bytes) image or label files (``FileNotFoundError`` /
  ``ValueError``; mmseg: the first time the loader reaches them, possibly hours into
  training). These file checks apply to local files read without ``backend_args``;
  ``check_files=False`` turns them off.
* ``CheckSegLabels``: a pipeline step right after ``LoadAnnotations`` that raises
  ``ValueError`` naming the label file for

  - label values outside ``[0, num_classes)`` other than the ignore index (named, with
    the values), instead of training on them silently;
  - a label map that is not a single-channel ``(H, W)`` array, e.g. an RGB (colour) label
    image, or a palette PNG decoded to colours by the ``cv2`` backend (mmseg keeps the
    ``(H, W, 3)`` array and later steps treat it as three maps);
  - a label map whose size differs from its image's (mmseg's resize steps would stretch it
    onto the image without a word). The label map must match the image as loaded
    (``ori_shape``), or its current size (``img_shape``) where the check runs after a
    resize of both;
  - a 16-bit (or 32-bit) label file with values outside ``[0, 255]``: mmseg's
    ``LoadAnnotations`` casts the decoded map to ``uint8``, which wraps such values modulo
    256 into other, valid-looking classes. The check reads the file's header (Pillow,
    lazily) and decodes it again only when it is not 8-bit. A 16-bit file whose values are
    all below 256 is accepted. Local files only; ``check_file=False`` turns it off.
"""
import os

import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.datasets import ADE20KDataset
from mmseg.registry import DATASETS, TRANSFORMS

# Pillow modes of label images deeper than 8 bits, which LoadAnnotations wraps to uint8.
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;32", "I;32L", "I;32B")


def _shown(items, limit: int = 5) -> str:
    items = list(items)
    return ", ".join(str(item) for item in items[:limit]) + (f" and {len(items) - limit} more"
                                                            if len(items) > limit else "")


def _is_local(path) -> bool:
    return "://" not in str(path)


@DATASETS.register_module()
class CheckedADE20KDataset(ADE20KDataset):
    def __init__(self, *args, check_files: bool = True, **kwargs):
        self.check_files = check_files
        super().__init__(*args, **kwargs)

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
        if self.check_files and self.backend_args is None:
            self._check_files(data_list)
        return data_list

    def _check_files(self, data_list):
        missing, empty = [], []
        for info in data_list:
            for key in ("img_path", "seg_map_path"):
                path = info.get(key)
                if not path or not _is_local(path):
                    continue
                try:
                    if os.stat(path).st_size == 0:
                        empty.append(path)
                except (FileNotFoundError, NotADirectoryError):
                    missing.append(path)
        if missing:
            raise FileNotFoundError(f"{len(missing)} label map(s) not found for the images in "
                                    f"{self.data_prefix.get('img_path')}: {_shown(missing)} (each image <name>"
                                    f"{self.img_suffix} needs <name>{self.seg_map_suffix} in "
                                    f"{self.data_prefix.get('seg_map_path')})")
        if empty:
            raise ValueError(f"{len(empty)} empty file(s) (0 bytes) in the dataset: {_shown(empty)}")


def _wide_label_values(path):
    """Values outside [0, 255] of a label file deeper than 8 bits, or None."""
    from PIL import Image

    try:
        with Image.open(path) as image:  # reads the header only
            if image.mode not in _WIDE_MODES:
                return None
            values = np.unique(np.asarray(image))
    except (OSError, ValueError):  # not an image Pillow reads (the loader decoded it): nothing to say
        return None
    bad = values[(values < 0) | (values > 255)]
    return bad if bad.size else None


@TRANSFORMS.register_module()
class CheckSegLabels(BaseTransform):
    """Raise ``ValueError`` for label values outside ``[0, num_classes)`` and ``ignore_index``,
    label maps that are not single-channel or not the size of their image, and label files
    deeper than 8 bits with values that ``LoadAnnotations`` wraps modulo 256."""

    def __init__(self, num_classes: int = 150, ignore_index: int = 255, check_file: bool = True):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.check_file = check_file

    def transform(self, results: dict) -> dict:
        labels = results.get("gt_seg_map")
        if labels is not None:
            path = results.get("seg_map_path")
            labels = np.asarray(labels)
            if labels.ndim != 2:
                channels = f"{labels.shape[2]} channels" if labels.ndim == 3 else f"{labels.ndim} dimension(s)"
                raise ValueError(f"label map {path} has shape {tuple(labels.shape)} ({channels}): expected a "
                                 "single-channel (H, W) map of class indices (an RGB/colour label image must be "
                                 "converted to class indices first)")
            self._check_size(results, labels, path)
            if self.check_file and path and _is_local(path) and os.path.isfile(path):
                wide = _wide_label_values(path)
                if wide is not None:
                    raise ValueError(f"label map {path} is deeper than 8 bits and has values {wide.tolist()[:10]} "
                                     "outside [0, 255], which LoadAnnotations would wrap modulo 256 (it casts to "
                                     "uint8) into other classes")
            values = np.unique(labels)
            bad = values[((values < 0) | (values >= self.num_classes)) & (values != self.ignore_index)]
            if bad.size:
                raise ValueError(f"label map {path} has values {bad.tolist()[:10]} outside "
                                 f"[0, {self.num_classes}) that are not the ignore index {self.ignore_index}"
                                 + (" (after reduce_zero_label)" if results.get("reduce_zero_label") else ""))
        return results

    @staticmethod
    def _check_size(results, labels, path):
        image = results.get("img")
        shapes = [results.get(key) for key in ("ori_shape", "img_shape")]
        if image is not None:
            shapes.append(np.shape(image)[:2])
        shapes = [tuple(int(size) for size in shape[:2]) for shape in shapes if shape is not None]
        if shapes and tuple(labels.shape) not in shapes:
            height, width = shapes[0]
            raise ValueError(f"label map {path} is {labels.shape[0]}x{labels.shape[1]} (height x width) but its image "
                             f"{results.get('img_path')} is {height}x{width}: a label map must have its image's "
                             "size (later resizes would stretch it onto the image)")

    def __repr__(self):
        return (f"{self.__class__.__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"check_file={self.check_file})")
