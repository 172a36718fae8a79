"""Small synthetic datasets in the COCO and ADE20K layouts, for tests and the quickstart.

Images show circles, squares and triangles of random colours and sizes, overlapping,
on textured backgrounds. Nothing is downloaded.
"""
import json
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field plus noise and stripes, so shapes are not trivially separable."""
    low = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float32)
    image = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
    stripes = 20 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    image += stripes[..., None] + rng.normal(0, 12, size=(size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw(shape: str, mask: np.ndarray, cx: float, cy: float, radius: float, angle: float) -> None:
    if shape == "circle":
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(radius)), 1, thickness=-1)
        return
    corners = 4 if shape == "square" else 3
    theta = angle + np.arange(corners) * 2 * np.pi / corners
    points = np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], -1)
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)


def render_scene(rng: np.random.Generator, size: int, max_objects: int = 4,
                 min_area: int = 30) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One image and its visible instances as (class index, binary mask)."""
    image = _background(rng, size)
    instances: List[Tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(CLASSES)))
        radius = rng.uniform(0.08, 0.25) * size
        cx, cy = rng.uniform(radius * 0.5, size - radius * 0.5, size=2)
        mask = np.zeros((size, size), np.uint8)
        _draw(CLASSES[label], mask, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        colour = rng.integers(0, 256, size=3)
        image[mask.astype(bool)] = colour
        # The new shape hides what it covers of the earlier ones.
        instances = [(lbl, m & (1 - mask)) for lbl, m in instances]
        instances.append((label, mask))
    return image, [(lbl, m) for lbl, m in instances if int(m.sum()) >= min_area]


def make_coco_shapes(root: str, num_train: int = 8, num_val: int = 4, size: int = 64, seed: int = 0,
                     max_objects: int = 4) -> Dict[str, str]:
    """Write ``root/{train,val}/*.png`` and ``root/annotations/instances_{train,val}.json``.

    Returns the paths of the two annotation files. Masks are stored as COCO RLE.
    """
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    paths = {}
    for split, count in (("train", num_train), ("val", num_val)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image, instances = render_scene(rng, size, max_objects=max_objects)
            file_name = f"{index:06d}.png"
            cv2.imwrite(os.path.join(root, split, file_name), image[..., ::-1])
            images.append(dict(id=index + 1, file_name=file_name, height=size, width=size))
            for label, mask in instances:
                rle = mask_utils.encode(np.asfortranarray(mask))
                x, y, w, h = mask_utils.toBbox(rle).tolist()
                rle["counts"] = rle["counts"].decode("ascii")
                annotations.append(dict(id=len(annotations) + 1, image_id=index + 1, category_id=label + 1,
                                        segmentation=rle, area=float(mask.sum()), bbox=[x, y, w, h],
                                        iscrowd=0))
        coco = dict(images=images, annotations=annotations,
                    categories=[dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)])
        paths[split] = os.path.join(root, "annotations", f"instances_{split}.json")
        with open(paths[split], "w") as f:
            json.dump(coco, f)
    return paths


def make_ade_shapes(root: str, num_train: int = 6, num_val: int = 3, size: int = 64, seed: int = 0,
                    ignore_fraction: float = 0.05) -> None:
    """Write an ADE20K-layout dataset: ``images/{training,validation}/*.jpg`` and
    ``annotations/{training,validation}/*.png``. Label maps use ADE20K's convention
    (0 = "other", reduced to the ignore index 255 by ``reduce_zero_label``; class k+1 =
    shape k) and include some 0 pixels."""
    rng = np.random.default_rng(seed)
    for split, count in (("training", num_train), ("validation", num_val)):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
        for index in range(count):
            image, instances = render_scene(rng, size, min_area=1)
            label = np.full((size, size), len(CLASSES) + 1, np.uint8)  # background class
            for cls, mask in instances:
                label[mask.astype(bool)] = cls + 1
            label[rng.random((size, size)) < ignore_fraction] = 0
            name = f"ADE_{split}_{index:08d}"
            cv2.imwrite(os.path.join(root, "images", split, name + ".jpg"), image[..., ::-1])
            cv2.imwrite(os.path.join(root, "annotations", split, name + ".png"), label)
