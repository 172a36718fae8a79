"""Data checks of CheckedCocoDataset, CheckedLoadImageFromFile, CheckedADE20KDataset and
CheckSegLabels: bad annotation files, images and label maps get an error that names the
file and the problem (or, where mmdet skips, a counted, logged skip), on tiny synthetic
data written to tmp_path."""
import json
import math
import re
import shutil

import cv2
import numpy as np
import pytest
from mmengine.registry import init_default_scope

import internimage  # noqa: F401
from internimage.datasets.synthetic import make_ade_shapes, make_coco_shapes

CLASSES = ("circle", "square", "triangle")


# --------------------------------------------------------------------------- COCO

@pytest.fixture(scope="module")
def coco_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_template")
    make_coco_shapes(str(root), num_train=4, num_val=1, size=32, seed=1)
    return root


@pytest.fixture
def coco(coco_template, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_template, root)
    return root


def ann_path(root):
    return root / "annotations" / "instances_train.json"


def edit(root, change):
    data = json.loads(ann_path(root).read_text())
    change(data)
    ann_path(root).write_text(json.dumps(data))
    return data


def build(root, pipeline=(), **kwargs):
    from mmdet.registry import DATASETS

    init_default_scope("mmdet")
    cfg = dict(type="CheckedCocoDataset", data_root=str(root), ann_file="annotations/instances_train.json",
               data_prefix=dict(img="train/"), metainfo=dict(classes=CLASSES), pipeline=list(pipeline))
    cfg.update(kwargs)
    return DATASETS.build(cfg)


def raises_naming_file(message):
    return pytest.raises(ValueError, match=r"instances_train\.json: .*" + message)


def test_valid_coco_still_loads(coco):
    assert len(build(coco)) == 4


def test_duplicate_image_id_is_rejected(coco):
    def change(data):  # image 2 takes id 1 and keeps its annotations: pycocotools would merge the two
        data["images"][1]["id"] = 1
        for ann in data["annotations"]:
            ann["image_id"] = 1 if ann["image_id"] == 2 else ann["image_id"]
    edit(coco, change)
    with raises_naming_file(r"1 image id\(s\) appear more than once in 'images'.*"
                            r"id 1 for \['000000\.png', '000001\.png'\]"):
        build(coco)


def test_duplicate_annotation_id_is_rejected(coco):
    def change(data):
        assert len(data["annotations"]) >= 3
        data["annotations"][2]["id"] = data["annotations"][0]["id"]
    edit(coco, change)
    with raises_naming_file(r"1 annotation id\(s\) appear more than once in 'annotations'.*: 1$"):
        build(coco)


def test_empty_images_list_is_rejected(coco):
    def change(data):
        data["images"], data["annotations"] = [], []
    edit(coco, change)
    with raises_naming_file(r"the file's 'images' list is missing or empty"):
        build(coco)


@pytest.mark.parametrize("key", ["id", "file_name", "width", "height"])
def test_image_without_required_field_is_rejected(coco, key):
    edit(coco, lambda data: data["images"][2].pop(key))
    with raises_naming_file(rf"1 image\(s\) have no '{key}': images\[2\]"):
        build(coco)


def test_image_with_bad_size_is_rejected(coco):
    edit(coco, lambda data: data["images"][0].update(width=0))
    with raises_naming_file(r"'width' that is not a positive number: images\[0\] \('000000\.png'\) width=0"):
        build(coco)


@pytest.mark.parametrize("key", ["id", "image_id", "bbox", "category_id", "area"])
def test_annotation_without_required_field_is_rejected(coco, key):
    data = edit(coco, lambda data: data["annotations"][1].pop(key))
    ann_id = data["annotations"][1].get("id")
    with raises_naming_file(rf"1 annotation\(s\) have no '{key}': annotations\[1\] \(id {ann_id}\)"):
        build(coco)


def test_file_without_categories_is_rejected(coco):
    edit(coco, lambda data: data.pop("categories"))
    with raises_naming_file(r"the file has no 'categories'"):
        build(coco)


def test_classes_missing_from_categories_are_rejected(coco):
    with raises_naming_file(r"the dataset's classes hexagon are not among the file's category names"):
        build(coco, metainfo=dict(classes=("circle", "hexagon", "square", "triangle")))


@pytest.mark.parametrize("bbox", [[1.0, 2.0, math.nan, 4.0], [1.0, 2.0, math.inf, 4.0], [1.0, 2.0, 3.0]])
def test_non_finite_or_short_boxes_are_rejected(coco, bbox):
    # json writes NaN/Infinity, which Python's json (and so pycocotools) reads back.
    edit(coco, lambda data: data["annotations"][0].update(bbox=bbox))
    with raises_naming_file(r"1 annotation\(s\) have a 'bbox' that is not 4 finite numbers .*id 1 bbox="):
        build(coco)


def test_flat_polygon_list_is_rejected(coco):
    edit(coco, lambda data: data["annotations"][0].update(segmentation=[1, 1, 5, 1, 5, 5]))
    with raises_naming_file(r"neither a list of polygons .* ids 1$"):
        build(coco)


def test_bad_boxes_and_polygons_are_skipped_counted_and_logged(coco, monkeypatch):
    from mmdet.datasets import CocoDataset

    import internimage.datasets.coco as det_datasets

    logged = []
    monkeypatch.setattr(det_datasets, "print_log", lambda message, **kwargs: logged.append((message, kwargs)))

    def change(data):
        anns = data["annotations"]
        anns[0]["bbox"][2] = -anns[0]["bbox"][2]  # negative width
        anns[1]["bbox"][3] = -3.0  # negative height
        anns[2]["bbox"] = [100.0, 100.0, 5.0, 5.0]  # outside the 32x32 image
        anns[3]["segmentation"] = [[1, 1, 5, 1]]  # a 2-point polygon
        anns[4]["segmentation"] = [[1, 1, 9, 1, 9, 9], [3, 3, 4, 4, 5]]  # one good, one odd-length
    edit(coco, change)
    dataset = build(coco)
    assert len(logged) == 1
    message, kwargs = logged[0]
    assert kwargs["level"] >= 30  # logging.WARNING
    assert "instances_train.json: left out" in message
    assert re.search(r"2 annotation\(s\) with a negative width or height \(dropped by CocoDataset\): ids 1, 2", message)
    assert re.search(r"1 annotation\(s\) with a box outside the image.*: ids 3", message)
    assert re.search(r"2 annotation\(s\) with polygons of fewer than 3 points .*: ids 4, 5", message)
    # The data used is what mmdet's CocoDataset makes of the file.
    init_default_scope("mmdet")
    plain = CocoDataset(data_root=str(coco), ann_file="annotations/instances_train.json",
                        data_prefix=dict(img="train/"), metainfo=dict(classes=CLASSES), pipeline=[])
    assert [len(dataset[i]["instances"]) for i in range(len(dataset))] == \
        [len(plain[i]["instances"]) for i in range(len(plain))]
    # A clean file logs nothing.
    logged.clear()
    shutil.copy(coco / "annotations" / "instances_val.json", ann_path(coco))
    build(coco, data_prefix=dict(img="val/"))
    assert logged == []


def test_empty_image_file_is_rejected_at_build_time(coco):
    (coco / "train" / "000002.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"1 image\(s\) listed in .*instances_train\.json are empty files "
                                         r"\(0 bytes\): .*train/000002\.png"):
        build(coco)


def load_image(path, **kwargs):
    from mmdet.registry import TRANSFORMS

    init_default_scope("mmdet")
    load = TRANSFORMS.build(dict(type="CheckedLoadImageFromFile", **kwargs))
    return load(dict(img_path=str(path)))


def write_jpeg(path, size=32, exif_thumbnail=False, trailer=b""):
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", image)[1].tobytes()
    if exif_thumbnail:  # an APP1 segment holding a small JPEG (its own SOS ... FFD9) before the main image
        thumb = cv2.imencode(".jpg", image[:8, :8])[1].tobytes()
        payload = b"Exif\x00\x00" + thumb
        data = data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]
    path.write_bytes(data + trailer)
    return data + trailer


@pytest.mark.parametrize("kind", ["empty", "png", "jpeg", "jpeg_with_thumbnail", "garbage"])
def test_bad_image_files_are_named_at_load_time(coco, tmp_path, kind):
    path = coco / "train" / "000001.png"
    if kind == "empty":
        path.write_bytes(b"")
        message = r"is empty \(0 bytes\)"
    elif kind == "png":
        path.write_bytes(path.read_bytes()[:-40])
        message = r"is truncated \(\d+ bytes; the PNG has no IEND chunk\)"
    elif kind == "garbage":
        path.write_bytes(b"not an image at all")
        message = r"cannot be decoded \(19 bytes; the decoder returned nothing\)"
    else:
        path = tmp_path / "cut.jpg"
        data = write_jpeg(path, exif_thumbnail=kind == "jpeg_with_thumbnail")
        path.write_bytes(data[:len(data) * 2 // 3])
        message = r"is truncated \(\d+ bytes; the JPEG data has no end-of-image marker\)"
    with pytest.raises(ValueError, match=rf"image {re.escape(str(path))} {message}"):
        load_image(path)
    assert load_image(path, ignore_empty=True) is None


def test_good_images_load_with_the_checked_transform(coco, tmp_path):
    results = load_image(coco / "train" / "000000.png")
    assert results["img"].shape == (32, 32, 3) and results["ori_shape"] == (32, 32)
    for name, kwargs in (("plain", {}), ("thumbnail", dict(exif_thumbnail=True)),
                         ("trailer", dict(trailer=b"\x00\x00ftypmp42 video after the image"))):
        path = tmp_path / f"{name}.jpg"
        write_jpeg(path, **kwargs)
        assert load_image(path)["img"].shape == (32, 32, 3), name
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*nothere\.png"):
        load_image(tmp_path / "nothere.png")
    # In a detection pipeline, in place of LoadImageFromFile.
    dataset = build(coco, pipeline=[dict(type="CheckedLoadImageFromFile"),
                                    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
                                    dict(type="Resize", scale=(64, 64), keep_ratio=True), dict(type="PackDetInputs")])
    sample = dataset[0]
    assert sample["inputs"].shape == (3, 64, 64) and len(sample["data_samples"].gt_instances) > 0


def test_pipeline_errors_name_the_image(coco):
    # With mmcv's own LoadImageFromFile (and the build-time checks off), an empty file gives
    # a cv2 error that does not name it: the dataset adds a note.
    (coco / "train" / "000002.png").write_bytes(b"")
    dataset = build(coco, pipeline=[dict(type="LoadImageFromFile")], check_files=False)
    index = [dataset.get_data_info(i)["img_path"].endswith("000002.png") for i in range(len(dataset))].index(True)
    with pytest.raises(Exception) as excinfo:
        dataset[index]
    assert any("000002.png" in note for note in getattr(excinfo.value, "__notes__", [])), excinfo.value
    # The checked transform names it in the message itself.
    dataset = build(coco, pipeline=[dict(type="CheckedLoadImageFromFile")], check_files=False)
    with pytest.raises(ValueError, match=r"image .*train/000002\.png is empty \(0 bytes\)"):
        dataset[index]


# --------------------------------------------------------------------------- ADE20K

@pytest.fixture
def ade(tmp_path):
    root = tmp_path / "ade"
    make_ade_shapes(str(root), num_train=2, num_val=1, size=32, seed=3)
    return root


def label_files(root):
    return sorted((root / "annotations" / "training").glob("*.png"))


TRAIN = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True),
         dict(type="CheckSegLabels", num_classes=150, ignore_index=255)]
TEST = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=(64, 64), keep_ratio=True),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="CheckSegLabels", num_classes=150, ignore_index=255)]


def build_ade(root, pipeline=TRAIN, **kwargs):
    from mmseg.registry import DATASETS

    init_default_scope("mmseg")
    return DATASETS.build(dict(type="CheckedADE20KDataset", data_root=str(root), pipeline=pipeline,
                               data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
                               **kwargs))


def test_valid_ade_passes_the_checks(ade):
    for pipeline in (TRAIN, TEST):
        sample = build_ade(ade, pipeline)[0]
        assert sample["gt_seg_map"].shape == (32, 32)


@pytest.mark.parametrize("imdecode_backend", ["pillow", "cv2"])
def test_rgb_label_map_is_rejected(ade, imdecode_backend):
    path = label_files(ade)[0]
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), np.stack([label] * 3, -1))  # same class values, three channels
    pipeline = [dict(TRAIN[0]), dict(TRAIN[1], imdecode_backend=imdecode_backend), TRAIN[2]]
    with pytest.raises(ValueError, match=rf"label map {re.escape(str(path))} has shape \(32, 32, 3\) "
                                         r"\(3 channels\): expected a single-channel"):
        build_ade(ade, pipeline)[0]


@pytest.mark.parametrize("pipeline", [TRAIN, TEST], ids=["train", "test"])
def test_label_map_of_another_size_is_rejected(ade, pipeline):
    path = label_files(ade)[0]
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), cv2.resize(label, (16, 24), interpolation=cv2.INTER_NEAREST))
    with pytest.raises(ValueError, match=rf"label map {re.escape(str(path))} is 24x16 \(height x width\) but its "
                                         r"image .*ADE_training_00000000\.jpg is 32x32"):
        build_ade(ade, pipeline)[0]


def test_16_bit_label_values_above_255_are_rejected(ade):
    path = label_files(ade)[0]
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.uint16)
    # 257, 300 and 260 wrap to 1, 44 and 4: valid classes 0, 43 and 3 after reduce_zero_label.
    label[0, :3] = [257, 300, 260]
    cv2.imwrite(str(path), label)
    dataset = build_ade(ade)
    with pytest.raises(ValueError, match=rf"label map {re.escape(str(path))} is deeper than 8 bits and has values "
                                         r"\[257, 260, 300\] outside \[0, 255\]"):
        dataset[0]
    # A 16-bit file whose values all fit in 8 bits is fine; check_file=False turns the check off.
    cv2.imwrite(str(path), np.minimum(label, 4))
    assert set(np.unique(dataset[0]["gt_seg_map"]).tolist()) <= {0, 1, 2, 3, 255}
    cv2.imwrite(str(path), label)
    off = build_ade(ade, TRAIN[:2] + [dict(TRAIN[2], check_file=False)])
    off[0]


def test_missing_or_empty_ade_files_are_named(ade):
    path = label_files(ade)[1]
    path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 label map\(s\) not found .*{re.escape(str(path))}"):
        build_ade(ade)
    assert len(build_ade(ade, check_files=False)) == 2
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"1 empty file\(s\) \(0 bytes\) in the dataset: {re.escape(str(path))}"):
        build_ade(ade)
