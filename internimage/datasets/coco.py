"""COCO with input checks, for mmdet 3.x (registered by ``import internimage.datasets``).

``CheckedCocoDataset`` is mmdet's ``CocoDataset`` that fails at build time, with the
annotation file and the offending ids or files named, where ``CocoDataset`` would fail deep
inside a training run (a bare ``KeyError``, an ``open`` error from pycocotools) or silently
drop or move data.

Rejected when the dataset is built (``ValueError`` that starts with the annotation file,
``FileNotFoundError`` for missing files):

* the annotation file does not exist;
* the file is not a COCO object, or its ``images`` list is missing or empty;
* an image without ``id``, ``file_name``, ``width`` or ``height``, or with a width or
  height that is not a positive number;
* duplicate image ids (pycocotools keeps the last image of an id: the other image is
  dropped and its annotations are moved onto the one kept), duplicate annotation ids
  (pycocotools keeps the last annotation of an id; ``CocoDataset`` then stops on an
  ``AssertionError`` that names no id) and duplicate category ids;
* no ``categories`` (``CocoDataset`` then drops every annotation), a category without
  ``id`` or ``name``, or dataset classes (``metainfo['classes']``) that are not among the
  file's category names (``CocoDataset`` leaves them out, so the labels of the classes
  after them no longer match their names);
* an annotation without ``id``, ``image_id``, ``category_id``, ``bbox`` or ``area``;
  a ``bbox`` that is not 4 finite numbers or an ``area`` that is not a finite number
  (``CocoDataset`` drops a box with NaN in some positions and trains on one with an
  infinite width); a ``segmentation`` that is neither a list of polygons (lists) nor an
  RLE dict, e.g. a flat list of numbers (a ``TypeError`` in ``LoadAnnotations``);
* an annotation that refers to an image id or a category id that the file does not list
  (pycocotools indexes it under that id and mmdet never reads it, or a ``KeyError``);
* an image file that is missing or empty (0 bytes) (``CocoDataset``: the first time the
  loader reaches it, possibly hours into training).

Skipped as mmdet does, but counted and logged: one warning per annotation file with the
count for each reason and the first annotation ids (the data used is unchanged):

* boxes with a negative width or height (``CocoDataset`` drops them);
* boxes ``CocoDataset`` drops as degenerate: no overlap with the image, under 1 pixel
  wide or high, or ``area`` <= 0;
* polygons with fewer than 3 points (6 numbers) or an odd number of coordinates
  (mmdet's ``LoadAnnotations`` drops such polygons, and ignores an object left with
  none).

At load time:

* ``CheckedLoadImageFromFile`` (registered in mmdet's ``TRANSFORMS``; use it in place of
  ``LoadImageFromFile``) raises ``ValueError`` naming the image path for an empty file, a
  truncated JPEG (no end-of-image marker after the image data) or PNG (no ``IEND``
  chunk), or a file the decoder rejects or returns nothing for. mmcv's
  ``LoadImageFromFile`` raises a ``cv2.error`` that does not name the file for an empty
  one; for a truncated one an ``AssertionError`` (gone under ``python -O``, leaving a
  ``None`` image) or, with the Pillow backend, an ``OSError`` without the path; and
  older OpenCV builds decode a truncated JPEG into a partly grey image without a word.
  With ``ignore_empty=True`` such images are skipped (``None``), with a warning naming
  them.
* An error raised by ``CheckedCocoDataset``'s pipeline gets a note (PEP 678, shown in the
  traceback) naming the image path and index.

File checks apply to local files read without ``backend_args`` (a storage backend may map
local-looking paths elsewhere); ``check_files=False`` turns them off, e.g. for very large
datasets on slow network file systems.
"""
import logging
import math
import os
from collections import Counter, defaultdict
from numbers import Real

import mmcv
from mmcv.transforms import LoadImageFromFile
from mmdet.datasets import CocoDataset
from mmdet.datasets.api_wrappers import COCO
from mmdet.registry import DATASETS, TRANSFORMS
from mmengine import fileio
from mmengine.logging import print_log


def _shown(items, limit: int = 5) -> str:
    items = list(items)
    return ", ".join(str(item) for item in items[:limit]) + (f" and {len(items) - limit} more"
                                                            if len(items) > limit else "")


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _duplicates(values) -> list:
    return [value for value, count in Counter(values).items() if count > 1]


def _image_name(image) -> str:
    return f"images[{image[0]}]" + (f" ({image[1]['file_name']!r})" if "file_name" in image[1] else "")


class _CheckedCOCO(COCO):
    def createIndex(self, *args, **kwargs):  # noqa: N802 (pycocotools' name)
        data = self.dataset
        if not isinstance(data, dict):
            raise ValueError(f"not a COCO annotation file: the top level is a {type(data).__name__}, not an object "
                             "with 'images', 'annotations' and 'categories'")
        images = data.get("images")
        if not isinstance(images, list) or not images:
            raise ValueError("the file's 'images' list is missing or empty" if not images
                             else f"'images' is a {type(images).__name__}, not a list")
        self._check_images(images)
        categories = data.get("categories")
        if not isinstance(categories, list) or not categories:
            raise ValueError("the file has no 'categories' (CocoDataset would drop every annotation)")
        self._check_categories(categories)
        annotations = data.get("annotations", [])
        if not isinstance(annotations, list):
            raise ValueError(f"'annotations' is a {type(annotations).__name__}, not a list")
        self._check_annotations(annotations)
        image_ids = {image["id"] for image in images}
        category_ids = {category["id"] for category in categories}
        for ann in annotations:
            if ann.get("image_id") not in image_ids:
                raise ValueError(f"annotation id {ann.get('id')} refers to image id {ann.get('image_id')}, "
                                 "which is not in the file's 'images'")
            if ann.get("category_id") not in category_ids:
                raise ValueError(f"annotation id {ann.get('id')} has category_id {ann.get('category_id')}, "
                                 f"which is not in the file's 'categories' {sorted(category_ids)}")
        return super().createIndex(*args, **kwargs)

    def get_cat_ids(self, cat_names=[], *args, **kwargs):  # noqa: B006 (mmdet's signature)
        """mmdet's, failing for class names that are not among the file's categories."""
        names = {category["name"] for category in self.dataset["categories"]}
        wanted = [cat_names] if isinstance(cat_names, str) else list(cat_names or ())
        absent = [name for name in wanted if name not in names]
        if absent:
            raise ValueError(f"the dataset's classes {_shown(absent, 10)} are not among the file's category names "
                             f"{_shown(sorted(names), 20)} (CocoDataset would leave them out, and the labels of "
                             "the classes after them would no longer match their names; set "
                             "metainfo=dict(classes=...) to the file's names)")
        return super().get_cat_ids(cat_names, *args, **kwargs)

    @staticmethod
    def _check_images(images):
        not_dicts = [index for index, image in enumerate(images) if not isinstance(image, dict)]
        if not_dicts:
            raise ValueError(f"{len(not_dicts)} entries of 'images' are not objects: images[{_shown(not_dicts)}]")
        for key in ("id", "file_name", "width", "height"):
            lacking = [(index, image) for index, image in enumerate(images) if image.get(key) is None]
            if lacking:
                raise ValueError(f"{len(lacking)} image(s) have no '{key}': {_shown(map(_image_name, lacking))}")
        for key in ("width", "height"):
            bad = [(index, image) for index, image in enumerate(images)
                   if not _is_finite(image[key]) or image[key] <= 0]
            if bad:
                raise ValueError(f"{len(bad)} image(s) have a '{key}' that is not a positive number: "
                                 + _shown(f"{_image_name(item)} {key}={item[1][key]!r}" for item in bad))
        duplicates = _duplicates(image["id"] for image in images)
        if duplicates:
            names = defaultdict(list)
            for image in images:
                if image["id"] in duplicates:
                    names[image["id"]].append(image["file_name"])
            raise ValueError(f"{len(duplicates)} image id(s) appear more than once in 'images' (pycocotools would keep "
                             "one image per id and move the annotations of the others onto it): "
                             + _shown(f"id {key} for {value}" for key, value in names.items()))

    @staticmethod
    def _check_categories(categories):
        for key in ("id", "name"):
            lacking = [index for index, category in enumerate(categories)
                       if not isinstance(category, dict) or category.get(key) is None]
            if lacking:
                raise ValueError(f"{len(lacking)} categor(y/ies) have no '{key}': categories[{_shown(lacking)}]")
        duplicates = _duplicates(category["id"] for category in categories)
        if duplicates:
            raise ValueError(f"category id(s) {_shown(duplicates)} appear more than once in 'categories'")

    @staticmethod
    def _check_annotations(annotations):
        not_dicts = [index for index, ann in enumerate(annotations) if not isinstance(ann, dict)]
        if not_dicts:
            raise ValueError(f"{len(not_dicts)} entries of 'annotations' are not objects: "
                             f"annotations[{_shown(not_dicts)}]")
        for key in ("id", "image_id", "category_id", "bbox", "area"):
            lacking = [index for index, ann in enumerate(annotations) if ann.get(key) is None]
            if lacking:
                raise ValueError(f"{len(lacking)} annotation(s) have no '{key}': "
                                 + _shown(f"annotations[{index}] (id {annotations[index].get('id')})"
                                          for index in lacking))
        duplicates = _duplicates(ann["id"] for ann in annotations)
        if duplicates:
            raise ValueError(f"{len(duplicates)} annotation id(s) appear more than once in 'annotations' "
                             f"(pycocotools would keep one annotation per id): {_shown(duplicates)}")
        bad_boxes = [ann for ann in annotations
                     if not isinstance(ann["bbox"], (list, tuple)) or len(ann["bbox"]) != 4
                     or not all(_is_finite(value) for value in ann["bbox"])]
        if bad_boxes:
            raise ValueError(f"{len(bad_boxes)} annotation(s) have a 'bbox' that is not 4 finite numbers "
                             "[x, y, width, height] (NaN, Inf, missing or non-numeric values): "
                             + _shown(f"id {ann['id']} bbox={ann['bbox']!r}" for ann in bad_boxes))
        bad_areas = [ann for ann in annotations if not _is_finite(ann["area"])]
        if bad_areas:
            raise ValueError(f"{len(bad_areas)} annotation(s) have an 'area' that is not a finite number: "
                             + _shown(f"id {ann['id']} area={ann['area']!r}" for ann in bad_areas))
        bad_segmentations = [ann["id"] for ann in annotations if not _segmentation_is_well_formed(ann)]
        if bad_segmentations:
            raise ValueError(f"{len(bad_segmentations)} annotation(s) have a 'segmentation' that is neither a list "
                             "of polygons (lists of numbers) nor an RLE object: ids " + _shown(bad_segmentations))


def _segmentation_is_well_formed(ann) -> bool:
    segmentation = ann.get("segmentation")
    if segmentation is None or isinstance(segmentation, dict):
        return True
    return isinstance(segmentation, list) and all(isinstance(polygon, (list, tuple)) for polygon in segmentation)


def _malformed_polygons(ann) -> bool:
    """Polygons mmdet's ``LoadAnnotations`` drops: fewer than 6 numbers, or an odd count."""
    segmentation = ann.get("segmentation")
    return isinstance(segmentation, list) and any(len(polygon) < 6 or len(polygon) % 2 for polygon in segmentation)


def _is_local(path: str) -> bool:
    return "://" not in str(path)


# Skip reasons, in the order they are logged.
_NEGATIVE = "with a negative width or height (dropped by CocoDataset)"
_DEGENERATE = ("with a box outside the image, under 1 pixel wide or high, or of area <= 0 "
               "(dropped by CocoDataset)")
_POLYGONS = ("with polygons of fewer than 3 points or an odd number of coordinates (LoadAnnotations drops "
             "such polygons and ignores an object left with none)")


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
        self._skipped = defaultdict(list)
        try:
            data_list = super().load_data_list()
        except ValueError as error:
            raise ValueError(f"{self.ann_file}: {error}") from error
        self._log_skipped()
        missing, empty = [], []
        for info in data_list:
            if self._checks_file(info["img_path"]):
                try:
                    if os.stat(info["img_path"]).st_size == 0:
                        empty.append(info["img_path"])
                except (FileNotFoundError, NotADirectoryError):
                    missing.append(info["img_path"])
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) listed in {self.ann_file} not found: {_shown(missing)} "
                                    f"(data_prefix={self.data_prefix})")
        if empty:
            raise ValueError(f"{len(empty)} image(s) listed in {self.ann_file} are empty files (0 bytes): "
                             f"{_shown(empty)}")
        return data_list

    def parse_data_info(self, raw_data_info: dict):
        image = raw_data_info["raw_img_info"]
        for ann in raw_data_info["raw_ann_info"]:
            if ann.get("ignore", False) or ann["category_id"] not in self.cat_ids:
                continue
            x1, y1, w, h = ann["bbox"]
            inter_w = max(0, min(x1 + w, image["width"]) - max(x1, 0))
            inter_h = max(0, min(y1 + h, image["height"]) - max(y1, 0))
            if w < 0 or h < 0:
                self._skipped[_NEGATIVE].append(ann["id"])
            elif inter_w * inter_h == 0 or ann["area"] <= 0 or w < 1 or h < 1:
                self._skipped[_DEGENERATE].append(ann["id"])
            elif _malformed_polygons(ann):
                self._skipped[_POLYGONS].append(ann["id"])
        return super().parse_data_info(raw_data_info)

    def _log_skipped(self):
        skipped = [(reason, self._skipped[reason]) for reason in (_NEGATIVE, _DEGENERATE, _POLYGONS)
                   if self._skipped[reason]]
        if skipped:
            print_log(f"{self.ann_file}: left out " + "; ".join(
                f"{len(ids)} annotation(s) {reason}: ids {_shown(ids)}" for reason, ids in skipped),
                logger="current", level=logging.WARNING)

    def prepare_data(self, idx):
        try:
            return super().prepare_data(idx)
        except Exception as error:
            path = self.get_data_info(idx).get("img_path")
            if path and path not in str(error) and hasattr(error, "add_note"):
                error.add_note(f"(while loading image {path}, index {idx} of {self.ann_file})")
            raise


def _jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG has its end-of-image marker after its first scan's data.

    Walks the marker segments from the start (skipping APPn segments, so an Exif thumbnail's
    own markers do not count) to the first start-of-scan, then looks for FFD9 after it:
    entropy-coded data never contains FFD9, so a file cut anywhere in or before the image
    data has none. Data after the end-of-image marker (e.g. a motion photo's video) is fine.
    """
    pos, size = 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return True  # not a marker: leave the structure to the decoder
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        elif marker == 0xD9:  # end of image before any scan: the decoder will say
            return True
        elif marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", pos + 2) >= 0
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return False  # the file ends inside the headers


def image_bytes_problem(data: bytes):
    """What is wrong with an image file's bytes that a decoder may not report, or ``None``."""
    if not data:
        return "is empty (0 bytes)"
    if data[:2] == b"\xff\xd8" and not _jpeg_is_complete(data):
        return f"is truncated ({len(data)} bytes; the JPEG data has no end-of-image marker)"
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data.rfind(b"IEND") < 0:
        return f"is truncated ({len(data)} bytes; the PNG has no IEND chunk)"
    return None


@TRANSFORMS.register_module()
class CheckedLoadImageFromFile(LoadImageFromFile):
    """mmcv's ``LoadImageFromFile`` that names the image for an empty, truncated or
    undecodable file (``ValueError``) or one that cannot be read."""

    def transform(self, results: dict):
        filename = results["img_path"]
        try:
            if self.file_client_args is not None:
                img_bytes = fileio.FileClient.infer_client(self.file_client_args, filename).get(filename)
            else:
                img_bytes = fileio.get(filename, backend_args=self.backend_args)
        except FileNotFoundError as error:
            if self.ignore_empty:
                return self._skip(filename, "not found")
            raise FileNotFoundError(f"image file not found: {filename}") from error
        except Exception as error:
            if self.ignore_empty:
                return self._skip(filename, f"cannot be read ({error})")
            raise OSError(f"cannot read image {filename}: {type(error).__name__}: {error}") from error
        problem, img = image_bytes_problem(img_bytes), None
        if problem is None:
            try:
                img = mmcv.imfrombytes(img_bytes, flag=self.color_type, backend=self.imdecode_backend)
            except Exception as error:  # cv2.error, PIL's UnidentifiedImageError / OSError, ...
                problem = f"cannot be decoded ({len(img_bytes)} bytes; {type(error).__name__}: {error})"
            if img is None and problem is None:
                problem = f"cannot be decoded ({len(img_bytes)} bytes; the decoder returned nothing)"
        if problem is not None:
            if self.ignore_empty:
                return self._skip(filename, problem)
            raise ValueError(f"image {filename} {problem}")
        if self.to_float32:
            img = img.astype("float32")
        results["img"] = img
        results["img_shape"] = img.shape[:2]
        results["ori_shape"] = img.shape[:2]
        return results

    @staticmethod
    def _skip(filename, problem):
        print_log(f"skipped image {filename} (ignore_empty=True): it {problem}", logger="current",
                  level=logging.WARNING)
        return None
