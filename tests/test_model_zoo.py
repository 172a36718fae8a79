"""The model zoo as data: metafiles name configs that exist and build with the stated
parameter counts, and the README tables are generated from them. Also: the synthetic
COCO data that the quickstart trains on is valid COCO."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

import internimage
from internimage.engine.runner_utils import replace_sync_bn_with_bn

REPO = Path(__file__).resolve().parents[1]


def all_models():
    index = yaml.safe_load((REPO / "model-index.yml").read_text())
    for path in index["Import"]:
        for model in yaml.safe_load((REPO / path).read_text())["Models"]:
            yield model


MODELS_LIST = list(all_models())


def test_readme_tables_match_the_metafiles():
    result = subprocess.run([sys.executable, "tools/model_zoo.py", "--check"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_metafiles_cover_the_published_models():
    names = {m["Name"] for m in MODELS_LIST}
    assert {f"internimage_{v}" for v in ("t", "s", "b", "l", "xl", "h", "g")} <= names
    assert sum(1 for m in MODELS_LIST if m["Config"].startswith("configs/mask_rcnn/")) == 6
    assert sum(1 for m in MODELS_LIST if m["Config"].startswith("configs/cascade_mask_rcnn/")) == 4
    assert sum(1 for m in MODELS_LIST if m["Config"].startswith("configs/upernet/")) == 6
    for model in MODELS_LIST:
        assert model["Weights"].startswith("https://") and model["Results"]


@pytest.mark.parametrize("model", MODELS_LIST, ids=lambda m: m["Name"])
def test_metafile_entry_builds_with_its_parameter_count(model):
    config = model["Config"]
    with torch.device("meta"):
        if config.endswith(".py"):
            assert (REPO / config).exists(), config
            cfg = Config.fromfile(str(REPO / config))
            init_default_scope(cfg.default_scope)
            replace_sync_bn_with_bn(cfg)
            cfg.model.backbone.init_cfg = None
            built = MODELS.build(cfg.model)
        else:
            built = internimage.build_model(config)
    assert sum(p.numel() for p in built.parameters()) == model["Metadata"]["Parameters"]


def test_synthetic_coco_annotations_are_valid(tmp_path):
    import cv2
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from internimage.datasets.synthetic import make_coco_shapes

    paths = make_coco_shapes(str(tmp_path), num_train=6, num_val=2, size=96, seed=3)
    coco = COCO(paths["train"])
    assert len(coco.getImgIds()) == 6 and len(coco.getAnnIds()) > 0
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "square", "triangle"]
    union = {}
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann)
        assert mask.sum() == ann["area"] > 0
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert mask_utils.area(ann["segmentation"]) == ann["area"]
        union.setdefault(ann["image_id"], np.zeros_like(mask))
        assert not (union[ann["image_id"]] & mask).any(), "visible masks of one image must not overlap"
        union[ann["image_id"]] |= mask
    # Each mask covers pixels that were painted one flat colour (the shape's), not background.
    info = coco.loadImgs(coco.getImgIds())[0]
    image = cv2.imread(str(tmp_path / "train" / info["file_name"]))
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]])):
        pixels = image[coco.annToMask(ann).astype(bool)]
        assert (pixels == pixels[0]).all()
    json.loads(Path(paths["val"]).read_text())


def test_classification_weights_are_the_variant_tables_releases():
    from internimage.models.variants import pretrained_url

    with open(REPO / "configs" / "classification" / "metafile.yml") as f:
        models = yaml.safe_load(f)["Models"]
    assert {m["Name"]: m["Weights"] for m in models} == {
        f"internimage_{v}": pretrained_url(v) for v in ("t", "s", "b", "l", "xl", "h", "g")}
