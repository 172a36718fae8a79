"""Detection: the published configs build; tools/train.py, test.py, resume and
dist_train.sh work end to end on a tiny model and synthetic COCO data; layer decay."""
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
from internimage.optim import layer_id
from internimage.runner_utils import use_cpu_sync_bn_free_norms
from internimage.synthetic import make_coco_shapes

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "mask-rcnn_internimage-tiny_shapes.py"

# config -> (channels, drop_path, layer_scale, offset_scale, post_norm, lr, num_layers, decay, epochs)
RECIPES = {
    "mask_rcnn/mask-rcnn_internimage-t_fpn_1x_coco.py": (64, 0.2, 1.0, 1.0, False, 1e-4, 30, 1.0, 12),
    "mask_rcnn/mask-rcnn_internimage-t_fpn_3x_coco.py": (64, 0.2, 1.0, 1.0, False, 1e-4, 30, 1.0, 36),
    "mask_rcnn/mask-rcnn_internimage-s_fpn_1x_coco.py": (80, 0.3, 1.0, 1.0, True, 1e-4, 33, 1.0, 12),
    "mask_rcnn/mask-rcnn_internimage-s_fpn_3x_coco.py": (80, 0.3, 1.0, 1.0, True, 1e-4, 33, 1.0, 36),
    "mask_rcnn/mask-rcnn_internimage-b_fpn_1x_coco.py": (112, 0.4, 1.0, 1.0, True, 1e-4, 33, 1.0, 12),
    "mask_rcnn/mask-rcnn_internimage-b_fpn_3x_coco.py": (112, 0.4, 1.0, 1.0, True, 1e-4, 33, 1.0, 36),
    "cascade_mask_rcnn/cascade-mask-rcnn_internimage-l_fpn_1x_coco.py": (160, 0.4, 1.0, 2.0, True, 1e-4, 37, 0.94, 12),
    "cascade_mask_rcnn/cascade-mask-rcnn_internimage-l_fpn_3x_coco.py": (160, 0.4, 1.0, 2.0, True, 2e-4, 37, 0.90, 36),
    "cascade_mask_rcnn/cascade-mask-rcnn_internimage-xl_fpn_1x_coco.py": (192, 0.4, 1.0, 2.0, True, 1e-4, 39, 0.94, 12),
    "cascade_mask_rcnn/cascade-mask-rcnn_internimage-xl_fpn_3x_coco.py": (192, 0.6, 1.0, 2.0, True, 2e-4, 39, 0.90, 36),
}


def test_every_detection_config_is_listed():
    found = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").glob("*mask_rcnn/*.py")}
    assert found == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_detection_config_builds_with_official_recipe(name):
    from mmdet.registry import MODELS, TRANSFORMS

    channels, drop_path, layer_scale, offset_scale, post_norm, lr, num_layers, decay, epochs = RECIPES[name]
    cfg = Config.fromfile(str(REPO / "configs" / name))
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.channels, backbone.drop_path_rate, backbone.layer_scale,
            backbone.offset_scale, backbone.post_norm) == ("InternImage", channels, drop_path, layer_scale,
                                                           offset_scale, post_norm)
    assert backbone.init_cfg.type == "Pretrained" and backbone.init_cfg.checkpoint.endswith(".pth")
    assert cfg.model.neck.in_channels == [channels * 2 ** i for i in range(4)]
    assert cfg.optim_wrapper.optimizer.type == "AdamW" and cfg.optim_wrapper.optimizer.lr == lr
    assert cfg.optim_wrapper.optimizer.weight_decay == 0.05
    assert cfg.optim_wrapper.paramwise_cfg == dict(num_layers=num_layers, layer_decay_rate=decay)
    assert cfg.train_cfg.max_epochs == epochs
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    assert cfg.default_hooks.checkpoint.max_keep_ckpts == 3 and cfg.default_hooks.checkpoint.save_best
    init_default_scope("mmdet")
    for transform in cfg.train_dataloader.dataset.pipeline + cfg.test_dataloader.dataset.pipeline:
        TRANSFORMS.build(transform)
    use_cpu_sync_bn_free_norms(cfg)
    backbone.init_cfg = None  # no download in tests
    model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.backbone.parameters()) > 0
    if name.startswith("cascade"):
        heads = model.roi_head.bbox_head
        assert len(heads) == 3 and all(h.num_shared_convs == 4 and h.reg_decoded_bbox for h in heads)


def test_layer_decay_learning_rates():
    from mmengine.optim import build_optim_wrapper

    cfg = Config.fromfile(str(TINY))
    init_default_scope("mmdet")
    from mmdet.registry import MODELS

    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    total, rate, base_lr = 5 + 2, 0.9, 1e-3
    lr_of, wd_of = {}, {}
    for group in wrapper.optimizer.param_groups:
        for name in group["param_names"]:
            lr_of[name], wd_of[name] = group["lr"], group["weight_decay"]
    depths = [1, 1, 2, 1]
    expected_ids = {
        "backbone.patch_embed.conv1.weight": 0,
        "backbone.levels.0.blocks.0.dcn.offset.weight": 1,
        "backbone.levels.0.downsample.conv.weight": 2,
        "backbone.levels.1.blocks.0.mlp.fc1.weight": 2,
        "backbone.levels.2.blocks.1.mlp.fc1.weight": 4,
        "backbone.levels.2.downsample.conv.weight": 5,
        "backbone.levels.3.norm.0.weight": 5,  # last stage: with its own first block
        "neck.lateral_convs.0.conv.weight": 6,
        "roi_head.bbox_head.fc_cls.weight": 6,
    }
    for name, lid in expected_ids.items():
        assert layer_id(name, total, depths) == lid, name
        assert lr_of[name] == pytest.approx(base_lr * rate ** (total - 1 - lid)), name
    assert wd_of["backbone.levels.0.blocks.0.dcn.offset.weight"] == 0.05
    for name in ("backbone.levels.3.norm.0.weight", "backbone.levels.0.blocks.0.mlp.fc1.bias",
                 "backbone.patch_embed.norm1.1.weight", "neck.lateral_convs.0.conv.bias"):
        assert wd_of[name] == 0.0, name
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def shapes_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_coco")
    make_coco_shapes(str(root), num_train=8, num_val=4, size=64, seed=0)
    return str(root) + "/"


def run_tool(args, data_root, timeout=600):
    env = dict(os.environ, INTERNIMAGE_SHAPES_COCO=data_root, PYTHONPATH=str(REPO))
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def last_metrics(work_dir):
    """The last validation metrics that mmengine logged (vis_data/scalars.json)."""
    scalars = sorted(Path(work_dir).glob("*/vis_data/scalars.json"))[-1]
    records = [json.loads(line) for line in scalars.read_text().splitlines()]
    return [r for r in records if "coco/bbox_mAP" in r][-1]


def test_train_evaluate_resume_and_test(shapes_coco, tmp_path):
    work_dir = tmp_path / "work"
    log = run_tool([sys.executable, "tools/train.py", str(TINY), "--work-dir", str(work_dir)], shapes_coco)
    assert "Epoch(train) [1][4/4]" in log and "coco/bbox_mAP" in log and "coco/segm_mAP" in log
    assert (work_dir / "epoch_1.pth").exists()
    first = last_metrics(work_dir)
    assert 0.0 <= first["coco/bbox_mAP"] <= 1.0

    # A second run with more epochs resumes from the latest checkpoint of the work dir.
    log = run_tool([sys.executable, "tools/train.py", str(TINY), "--work-dir", str(work_dir), "--resume",
                    "--cfg-options", "train_cfg.max_epochs=2"], shapes_coco)
    assert re.search(r"resumed epoch: 1, iter: 4", log), log[-2000:]
    assert "Epoch(train) [2][4/4]" in log and "Epoch(train) [1]" not in log
    assert (work_dir / "epoch_2.pth").exists()
    second = last_metrics(work_dir)

    # tools/test.py on the final checkpoint reproduces the last validation metrics.
    out = tmp_path / "preds.pkl"
    log = run_tool([sys.executable, "tools/test.py", str(TINY), str(work_dir / "epoch_2.pth"),
                    "--work-dir", str(tmp_path / "test"), "--out", str(out), "--show-dir", str(tmp_path / "show")],
                   shapes_coco)
    tested = last_metrics_from_log(log)
    for key in ("coco/bbox_mAP", "coco/segm_mAP"):
        assert tested[key] == pytest.approx(second[key], abs=1e-3), key
    import mmengine

    assert out.exists() and len(mmengine.load(str(out))) == 4
    assert len(list((tmp_path / "show").rglob("*.png"))) == 4


def last_metrics_from_log(log):
    match = re.findall(r"coco/bbox_mAP: ([0-9.]+).*?coco/segm_mAP: ([0-9.]+)", log)
    assert match, log[-2000:]
    bbox, segm = match[-1]
    return {"coco/bbox_mAP": float(bbox), "coco/segm_mAP": float(segm)}


def test_dist_train_two_processes_on_cpu(shapes_coco, tmp_path):
    work_dir = tmp_path / "dist"
    env_port = str(29500 + os.getpid() % 1000)
    env = dict(os.environ, INTERNIMAGE_SHAPES_COCO=shapes_coco, PORT=env_port)
    result = subprocess.run(["bash", "tools/dist_train.sh", str(TINY), "2", "--work-dir", str(work_dir)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "world_size: 2" in log or "Distributed launcher: pytorch" in log
    # 8 images, 2 per process, 2 processes: 2 iterations per epoch.
    assert "Epoch(train) [1][2/2]" in log
    assert (work_dir / "epoch_1.pth").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_amp_without_gpu_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "tools/train.py", str(TINY), "--work-dir", str(tmp_path), "--amp"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--amp needs a GPU" in result.stderr
