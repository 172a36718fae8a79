"""Checkpoint release: publish_model, hash-verified loading, fine-tuning from a release,
and the quickstart script end to end on a few images."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import internimage  # noqa: F401
from internimage.datasets.synthetic import make_coco_shapes

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "mask-rcnn_internimage-tiny_shapes.py"


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """One epoch of the tiny Mask R-CNN; returns (checkpoint path, data root)."""
    root = tmp_path_factory.mktemp("release")
    data = root / "data"
    make_coco_shapes(str(data), num_train=4, num_val=2, size=64, seed=1)
    env = dict(os.environ, INTERNIMAGE_SHAPES_COCO=str(data) + "/")
    work = root / "work"
    result = subprocess.run([sys.executable, "tools/train.py", str(TINY), "--work-dir", str(work)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "epoch_1.pth", str(data) + "/"


def test_publish_strips_training_state_and_names_by_hash(trained_checkpoint, tmp_path):
    from internimage.checkpoint.publish import sha256_of

    ckpt, _ = trained_checkpoint
    out = subprocess.run([sys.executable, "tools/publish_model.py", str(ckpt), str(tmp_path / "tiny_det.pth")],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    published = Path(re.search(r"published (\S+)", out).group(1))
    assert re.fullmatch(r"tiny_det-[0-9a-f]{8}\.pth", published.name)
    assert sha256_of(str(published)).startswith(published.name[-12:-4])
    content = torch.load(published, weights_only=True)
    assert set(content) == {"meta", "state_dict"}
    meta = content["meta"]
    assert meta["dataset_meta"]["classes"] == ("circle", "square", "triangle")
    assert "InternImage" in meta["cfg"]
    assert {"internimage_version", "torch_version", "mmcv_version"} <= set(meta)
    original = torch.load(ckpt, weights_only=True)
    assert "optimizer" in original and "message_hub" in original
    assert content["state_dict"].keys() == original["state_dict"].keys()


def test_corrupted_release_is_refused(trained_checkpoint, tmp_path):
    from internimage.checkpoint import load_file
    from internimage.checkpoint.publish import publish_checkpoint
    from internimage.engine.runner_utils import check_checkpoint_argument

    ckpt, _ = trained_checkpoint
    published = publish_checkpoint(str(ckpt), str(tmp_path / "rel.pth"))
    load_file(published)  # intact: loads
    data = bytearray(Path(published).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(published).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt or was modified"):
        load_file(published)
    with pytest.raises(ValueError, match=r"corrupt or was modified"):  # what tools/test.py and train.py run first
        check_checkpoint_argument(published)


def test_fine_tune_from_release_with_other_class_count(trained_checkpoint, tmp_path):
    from mmdet.registry import MODELS
    from mmengine.runner import load_checkpoint

    from internimage.checkpoint.publish import publish_checkpoint

    ckpt, _ = trained_checkpoint
    published = publish_checkpoint(str(ckpt), str(tmp_path / "rel.pth"))
    weights = torch.load(published, weights_only=True)["state_dict"]
    cfg = Config.fromfile(str(TINY))
    cfg.model.roi_head.bbox_head.num_classes = 5
    cfg.model.roi_head.mask_head.num_classes = 5
    init_default_scope("mmdet")

    # Whole detector (load_from): the head with another class count is skipped.
    model = MODELS.build(cfg.model)
    load_checkpoint(model, published, map_location="cpu", strict=False)
    own = model.state_dict()
    for key, value in weights.items():
        if key.startswith("backbone.") or key.startswith("neck."):
            assert torch.equal(own[key], value), key
    assert own["roi_head.bbox_head.fc_cls.weight"].shape[0] == 6

    # Backbone only (init_cfg Pretrained): exactly the released backbone weights.
    cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=published)
    model = MODELS.build(cfg.model)
    model.init_weights()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, weights["backbone." + key]), key


def test_quickstart_script_end_to_end(tmp_path):
    work = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, "tools/quickstart.py", "--work-dir", str(work), "--epochs", "1", "--cfg-options",
         "train_dataloader.dataset.indices=16", "val_dataloader.dataset.indices=8", "train_cfg.val_interval=1",
         "default_hooks.checkpoint.interval=1"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "eta:" in log and "InternImage quickstart finished" in log
    metrics = json.loads((work / "metrics.json").read_text())
    assert 0.0 <= metrics["coco/bbox_mAP"] <= 1.0 and 0.0 <= metrics["coco/segm_mAP"] <= 1.0
    for name in ("predictions.png", "curves.png"):
        assert (work / name).stat().st_size > 1000
    assert list((work / "published").glob("mask-rcnn_internimage-mini_shapes-*.pth"))
    assert "tools/train.py configs/quickstart/mask-rcnn_internimage-mini_shapes.py --cfg-options load_from=" in log


def test_image_demo_draws_detections(trained_checkpoint, tmp_path):
    ckpt, data = trained_checkpoint
    image = sorted(Path(data, "val").glob("*.png"))[0]
    out = tmp_path / "demo.png"
    env = dict(os.environ, INTERNIMAGE_SHAPES_COCO=data)
    result = subprocess.run([sys.executable, "tools/image_demo.py", str(image), str(TINY), str(ckpt), "--out-file",
                             str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import cv2

    drawn = cv2.imread(str(out))
    assert drawn is not None and drawn.shape[:2] == cv2.imread(str(image)).shape[:2]
