"""ImageNet with input checks, for mmpretrain 1.x (registered by ``import internimage.datasets``).

``CheckedImageNet`` is mmpretrain's ``ImageNet`` (both layouts: class folders
``<split>/<wnid>/*.JPEG``, or ``meta/<split>.txt`` lines ``<file> <label>``) that fails at
build time, naming the folder or file, where ``ImageNet`` would assert (nothing at all
under ``python -O``), only warn, or fail hours into a run:

* the image folder or the annotation file does not exist (``FileNotFoundError``);
* the number of class folders differs from the dataset's classes (``metainfo['classes']``,
  by default the 1,000 ImageNet-1k names) (``ValueError``);
* a class folder without any image (``ImageNet`` only logs a warning: the class keeps its
  label but is never trained on) (``ValueError``; ``allow_empty_classes=True`` warns only);
* an annotation line whose label is not an integer in ``[0, number of classes)``, or that
  names an image that does not exist (``ValueError`` / ``FileNotFoundError`` with the line;
  file checks only for local files read without ``backend_args``, and ``check_files=False``
  turns them off).

Unreadable images are found when loaded: use ``CheckedLoadImageFromFile`` (the COCO
checks' loader, also registered in mmpretrain's ``TRANSFORMS``), which names the file of an
empty, truncated or undecodable image. With ``ignore_empty=False`` (default) such an image
stops the run; with ``ignore_empty=True`` it is skipped with a warning naming it and a
training run continues with another image. Evaluation never skips one (``ValueError``
naming the image): a top-1 over fewer images is not the dataset's top-1. Any other error of
the pipeline gets a note naming the image and its index.

``ClassCountCheckHook`` (mmpretrain's ``ClassNumCheckHook``, raising ``ValueError`` instead
of asserting):
before training, validation and testing, the number of classes of every part of the model
that states one (the backbone's head, ``data_preprocessor.num_classes``, the loss) must
equal the dataset's.
"""
import os

from mmpretrain.datasets import ImageNet
from mmpretrain.datasets.custom import find_folders
from mmpretrain.engine.hooks import ClassNumCheckHook as _MMPretrainClassNumCheckHook
from mmpretrain.registry import DATASETS, HOOKS, TRANSFORMS

from .coco import CheckedLoadImageFromFile

TRANSFORMS.register_module(name="CheckedLoadImageFromFile", module=CheckedLoadImageFromFile, force=True)


def _shown(items, limit: int = 5) -> str:
    items = list(items)
    return ", ".join(str(item) for item in items[:limit]) + (f" and {len(items) - limit} more"
                                                            if len(items) > limit else "")


@DATASETS.register_module()
class CheckedImageNet(ImageNet):
    """mmpretrain's ``ImageNet`` with the checks listed in :mod:`internimage.datasets.imagenet`.

    Args:
        allow_empty_classes: only warn (as ``ImageNet`` does) about class folders without images.
        check_files: check that the images an annotation file lists exist (local files).
        **kwargs: as for mmpretrain's ``ImageNet`` (``data_root``, ``split``, ``ann_file``,
            ``data_prefix``, ``metainfo``, ``pipeline``, ...).
    """

    def __init__(self, *args, allow_empty_classes: bool = False, check_files: bool = True, **kwargs):
        self.allow_empty_classes = allow_empty_classes
        self.check_files = check_files
        super().__init__(*args, **kwargs)

    def _local(self) -> bool:
        return self.check_files and getattr(self, "backend_args", None) is None and "://" not in self.img_prefix

    def _find_samples(self):
        folder = self.img_prefix
        if self._local() and not os.path.isdir(folder):
            raise FileNotFoundError(f"image folder not found: {folder} (expected class folders "
                                    f"{folder}/<class>/*.JPEG, or give ann_file)")
        if self.with_label:
            folders, _ = find_folders(folder)
            if self.CLASSES is not None and len(self.CLASSES) != len(folders):
                default = ", the ImageNet-1k names" if self.CLASSES == self.METAINFO["classes"] else ""
                raise ValueError(
                    f"{folder} has {len(folders)} class folders ({_shown(folders, 3)}) but the dataset has "
                    f"{len(self.CLASSES)} classes (metainfo['classes']{default}); give "
                    "metainfo=dict(classes=[...]) with one name per folder, in sorted folder order")
        samples = super()._find_samples()
        if self.with_label:
            used = {label for _, label in samples}
            empty = [name for name, index in sorted(self.folder_to_idx.items(), key=lambda x: x[1])
                     if index not in used]
            if empty and not self.allow_empty_classes:
                raise ValueError(
                    f"{len(empty)} class folder(s) of {folder} contain no image with an extension of "
                    f"{', '.join(sorted(self.extensions))}: {_shown(empty)}. Their classes would never be "
                    "trained on; add the images, remove the folders (and their class names), or pass "
                    "allow_empty_classes=True")
        return samples

    def load_data_list(self):
        if self.ann_file and not ("://" in self.ann_file or os.path.isfile(self.ann_file)):
            raise FileNotFoundError(f"annotation file not found: {self.ann_file}")
        if self.ann_file and self.with_label:
            self._check_annotation_lines()
        data_list = super().load_data_list()
        if self.ann_file and self._local():
            missing = [info["img_path"] for info in data_list if not os.path.isfile(info["img_path"])]
            if missing:
                raise FileNotFoundError(f"{len(missing)} image(s) listed in {self.ann_file} not found: "
                                        f"{_shown(missing)} (check_files=False skips this check)")
        return data_list

    def _check_annotation_lines(self):
        from mmengine.fileio import list_from_file

        num_classes = len(self.CLASSES) if self.CLASSES is not None else None
        for number, line in enumerate(list_from_file(self.ann_file), 1):
            parts = line.strip().rsplit(" ", 1)
            if not line.strip():
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{self.ann_file}, line {number}: expected '<image path> <integer label>', "
                                 f"got {line.strip()!r}")
            label = int(parts[1])
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise ValueError(f"{self.ann_file}, line {number}: label {label} is outside [0, {num_classes}) "
                                 f"(the dataset has {num_classes} classes, metainfo['classes'])")

    def prepare_data(self, idx):
        path = self.get_data_info(idx).get("img_path")
        try:
            data = super().prepare_data(idx)
        except Exception as error:
            if path and path not in str(error) and hasattr(error, "add_note"):
                error.add_note(f"(while loading image {path}, index {idx} of the {type(self).__name__} "
                               f"at {self.img_prefix})")
            raise
        if data is None and self.test_mode:
            raise ValueError(f"image {path} (index {idx}) could not be loaded, and an evaluation does not skip "
                             "images (its accuracy would be over fewer images than the dataset has); "
                             "replace or remove the file")
        return data


@HOOKS.register_module()
class ClassCountCheckHook(_MMPretrainClassNumCheckHook):
    """mmpretrain's ``ClassNumCheckHook`` with a ``ValueError`` that says what to change
    (its own asserts, which ``python -O`` removes)."""

    def _check_head(self, runner, dataset):
        classes = getattr(dataset, "CLASSES", None)
        if classes is None:
            return super()._check_head(runner, dataset)
        for name, module in runner.model.named_modules():
            count = getattr(module, "num_classes", None)
            if isinstance(count, int) and count != len(classes):
                where = name or type(runner.model).__name__
                raise ValueError(
                    f"the model's {where} ({type(module).__name__}) has num_classes={count}, but the "
                    f"{type(dataset).__name__} at {getattr(dataset, 'img_prefix', '?')} has {len(classes)} classes; "
                    f"set model.backbone.num_classes, model.data_preprocessor.num_classes and the loss's "
                    f"num_classes to {len(classes)}, or fix the dataset's classes")

