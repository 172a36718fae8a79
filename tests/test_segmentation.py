"""Segmentation: the published UperNet configs build (model and dataloaders); train,
evaluate, test (whole, sliding-window, multi-scale flip) and 2-process training on a tiny
model with synthetic ADE20K data; mmseg 0.x checkpoints; dataset errors."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import internimage  # noqa: F401
from internimage.datasets.synthetic import make_ade_shapes
from internimage.engine.runner_utils import replace_sync_bn_with_bn
from internimage.models.backbone import resolve_arch
from internimage.models.variants import ARCH_KEYS

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "upernet_internimage-tiny_shapes.py"
TINY_MS = REPO / "tests" / "configs" / "upernet_internimage-tiny_shapes_ms.py"

# config -> (crop, drop_path, layer_scale, offset_scale, post_norm, lr, num_layers, decay, published params)
RECIPES = {
    "upernet_internimage-t_512_160k_ade20k.py": (512, 0.2, 1.0, 1.0, False, 6e-5, 30, 1.0, 59e6),
    "upernet_internimage-s_512_160k_ade20k.py": (512, 0.3, 1.0, 1.0, True, 6e-5, 33, 1.0, 80e6),
    "upernet_internimage-b_512_160k_ade20k.py": (512, 0.4, 1.0, 1.0, True, 6e-5, 33, 1.0, 128e6),
    "upernet_internimage-l_640_160k_ade20k.py": (640, 0.4, 1.0, 2.0, True, 2e-5, 37, 0.94, 256e6),
    "upernet_internimage-xl_640_160k_ade20k.py": (640, 0.4, 1.0, 2.0, True, 2e-5, 39, 0.94, 368e6),
    "upernet_internimage-h_896_160k_ade20k.py": (896, 0.5, None, 1.0, False, 2e-5, 50, 0.95, 1.12e9),
    "upernet_internimage-g_896_160k_ade20k.py": (896, 0.5, None, 1.0, True, 2e-5, 56, 0.95, None),
}


@pytest.fixture(scope="module")
def shapes_ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_ade")
    make_ade_shapes(str(root), num_train=6, num_val=3, size=64, seed=0)
    return str(root) + "/"


def test_every_segmentation_config_is_listed():
    found = {p.name for p in (REPO / "configs" / "upernet").glob("*.py") if not p.name.endswith("_ms.py")}
    assert found == set(RECIPES)
    ms = {p.name.replace("_ms.py", ".py") for p in (REPO / "configs" / "upernet").glob("*_ms.py")}
    assert ms == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_segmentation_config_builds_model_and_dataloaders(name, shapes_ade):
    from mmengine.runner import Runner
    from mmseg.registry import MODELS

    crop, drop_path, layer_scale, offset_scale, post_norm, lr, num_layers, decay, params = RECIPES[name]
    cfg = Config.fromfile(str(REPO / "configs" / "upernet" / name))
    backbone = cfg.model.backbone
    arch = resolve_arch(backbone.arch, **{k: backbone.get(k) for k in ARCH_KEYS})
    assert (backbone.drop_path_rate, backbone.layer_scale, arch["offset_scale"], arch["post_norm"]) == (
        drop_path, layer_scale, offset_scale, post_norm)
    assert backbone.init_cfg.type == "Pretrained"
    assert cfg.model.data_preprocessor.size == (crop, crop)
    assert cfg.model.test_cfg.mode == ("whole" if crop == 512 else "slide")
    assert cfg.optim_wrapper.optimizer.lr == lr and cfg.optim_wrapper.optimizer.weight_decay == 0.05
    assert cfg.optim_wrapper.paramwise_cfg == dict(num_layers=num_layers, layer_decay_rate=decay)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.param_scheduler[0].end == 1500 and cfg.param_scheduler[1].power == 1.0
    assert cfg.train_dataloader.batch_size * (8 if crop < 896 else 16) == 16
    assert cfg.model.auxiliary_head.type == "FCNHead"
    assert cfg.model.decode_head.norm_cfg.type == "SyncBN"

    init_default_scope("mmseg")
    replace_sync_bn_with_bn(cfg)
    backbone.init_cfg = None
    with torch.device("meta"):  # full-size H and G without allocating their weights
        model = MODELS.build(cfg.model)
    if params is not None:
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - params) / params < 0.01, count
    for split in ("train_dataloader", "val_dataloader"):
        loader_cfg = cfg[split]
        loader_cfg.num_workers, loader_cfg.persistent_workers = 0, False
        loader_cfg.dataset.data_root = shapes_ade
        if split == "train_dataloader":
            loader_cfg.sampler = dict(type="DefaultSampler", shuffle=False)
        batch = next(iter(Runner.build_dataloader(loader_cfg)))
        assert batch["inputs"][0].shape[0] == 3


def run_tool(args, data_root, timeout=600):
    env = dict(os.environ, INTERNIMAGE_SHAPES_ADE=data_root, PYTHONPATH=str(REPO))
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def miou(log):
    values = re.findall(r"mIoU: ([0-9.]+)", log)
    assert values, log[-2000:]
    return float(values[-1])


def test_train_evaluate_and_test_whole_slide_and_multiscale(shapes_ade, tmp_path):
    work_dir = tmp_path / "work"
    log = run_tool([sys.executable, "tools/train.py", str(TINY), "--work-dir", str(work_dir)], shapes_ade)
    assert "Iter(train) [8/8]" in log and "No GPU: SyncBN layers of the model are built as BN" in log
    assert (work_dir / "iter_8.pth").exists()
    trained = miou(log)
    assert 0.0 <= trained <= 100.0

    ckpt = str(work_dir / "iter_8.pth")
    log = run_tool([sys.executable, "tools/test.py", str(TINY), ckpt, "--work-dir", str(tmp_path / "t1")],
                   shapes_ade)
    assert miou(log) == pytest.approx(trained, abs=0.01)

    log = run_tool([sys.executable, "tools/test.py", str(TINY), ckpt, "--work-dir", str(tmp_path / "t2"),
                    "--cfg-options", "model.test_cfg.mode=slide", "model.test_cfg.crop_size=(32,32)",
                    "model.test_cfg.stride=(24,24)"], shapes_ade)
    assert 0.0 <= miou(log) <= 100.0

    log = run_tool([sys.executable, "tools/test.py", str(TINY_MS), ckpt, "--work-dir", str(tmp_path / "t3"),
                    "--show-dir", str(tmp_path / "show")], shapes_ade)
    assert 0.0 <= miou(log) <= 100.0
    assert len(list((tmp_path / "show").rglob("*.png"))) == 3


def test_dist_train_two_processes_segmentation(shapes_ade, tmp_path):
    work_dir = tmp_path / "dist"
    env = dict(os.environ, INTERNIMAGE_SHAPES_ADE=shapes_ade, PORT=str(30500 + os.getpid() % 1000))
    result = subprocess.run(["bash", "tools/dist_train.sh", str(TINY), "2", "--work-dir", str(work_dir),
                             "--cfg-options", "train_cfg.max_iters=4", "train_cfg.val_interval=4"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Iter(train) [4/4]" in log and "mIoU" in log
    assert (work_dir / "iter_4.pth").exists()


def test_mmseg0_checkpoint_gives_the_same_logits(tmp_path):
    from mmengine.runner import load_checkpoint
    from mmseg.registry import MODELS

    cfg = Config.fromfile(str(TINY))
    init_default_scope("mmseg")
    replace_sync_bn_with_bn(cfg)
    torch.manual_seed(0)
    source = MODELS.build(cfg.model).eval()
    for p in source.parameters():
        p.data.normal_(0, 0.05)  # not the initialisation: a load that silently fails shows
    # mmseg 0.x wrote {'meta': {...,'CLASSES', 'PALETTE'}, 'state_dict': ...} from DDP ('module.' prefix).
    path = tmp_path / "upernet_mmseg0.pth"
    torch.save({"meta": {"mmseg_version": "0.27.0", "CLASSES": ("a",) * 150, "PALETTE": [[0, 0, 0]] * 150},
                "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
                "optimizer": {}}, path)
    target = MODELS.build(cfg.model).eval()
    load_checkpoint(target, str(path), map_location="cpu", strict=True)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target._forward(images), source._forward(images), rtol=0, atol=0)


def test_missing_ade20k_folder_is_named(tmp_path):
    from mmseg.registry import DATASETS

    init_default_scope("mmseg")
    (tmp_path / "images" / "training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "annotations" / "training"))):
        DATASETS.build(dict(type="CheckedADE20KDataset", data_root=str(tmp_path),
                            data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
                            pipeline=[]))


def test_label_values_outside_the_classes_are_reported(shapes_ade, tmp_path):
    import cv2
    from mmseg.registry import DATASETS

    init_default_scope("mmseg")
    root = tmp_path / "bad"
    make_ade_shapes(str(root), num_train=1, num_val=1, size=32)
    label_path = next((root / "annotations" / "training").glob("*.png"))
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    label[0, 0] = 200  # class 199 after reduce_zero_label: outside ADE20K's 150
    cv2.imwrite(str(label_path), label)
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True),
                dict(type="CheckSegLabels", num_classes=150, ignore_index=255)]
    dataset = DATASETS.build(dict(type="CheckedADE20KDataset", data_root=str(root), pipeline=pipeline,
                                  data_prefix=dict(img_path="images/training", seg_map_path="annotations/training")))
    with pytest.raises(ValueError, match=r"values \[199\] outside \[0, 150\)"):
        dataset[0]
    # The ignore index (0 in the file, 255 after reduction) is accepted.
    label[0, 0] = 0
    cv2.imwrite(str(label_path), label)
    assert np.isin(np.unique(dataset[0]["gt_seg_map"]), list(range(150)) + [255]).all()
