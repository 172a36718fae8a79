"""Detection: the published configs build; tools/train.py, test.py, resume and
dist_train.sh work end to end on a tiny model and synthetic COCO data; layer decay."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import internimage  # noqa: F401
from internimage.datasets.synthetic import make_coco_shapes
from internimage.engine.optimizers import layer_id
from internimage.engine.runner_utils import replace_sync_bn_with_bn
from internimage.models.backbone import resolve_arch
from internimage.models.variants import ARCH_KEYS, pretrained_url

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "mask-rcnn_internimage-tiny_shapes.py"
TINY_CASCADE = REPO / "tests" / "configs" / "cascade-mask-rcnn_internimage-tiny_shapes.py"

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
    arch = resolve_arch(backbone.arch, **{k: backbone.get(k) for k in ARCH_KEYS})
    assert (backbone.type, arch["channels"], backbone.drop_path_rate, backbone.layer_scale,
            arch["offset_scale"], arch["post_norm"]) == ("InternImage", channels, drop_path, layer_scale,
                                                         offset_scale, post_norm)
    assert backbone.init_cfg.type == "Pretrained" and backbone.init_cfg.checkpoint.startswith("internimage://")
    assert pretrained_url(backbone.init_cfg.checkpoint[len("internimage://"):]).endswith(".pth")
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
    replace_sync_bn_with_bn(cfg)
    backbone.init_cfg = None  # no download in tests
    model = MODELS.build(cfg.model)
    # The detectors' parameter counts (the model zoo's 49M / 69M / 115M / 277M / 387M).
    variant = name.split("internimage-")[1].split("_")[0]
    expected = {"t": 48_920_544, "s": 68_715_024, "b": 115_245_264, "l": 277_307_236, "xl": 387_448_974}
    assert sum(p.numel() for p in model.parameters()) == expected[variant]
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


def tool_env(data_root):
    return dict(os.environ, INTERNIMAGE_SHAPES_COCO=data_root, PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "helpers")]))


def run_tool(args, data_root, timeout=600, expect_ok=True):
    result = subprocess.run(args, cwd=REPO, env=tool_env(data_root), capture_output=True, text=True,
                            timeout=timeout)
    log = result.stdout + result.stderr
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return log
    return result.returncode, log


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
        assert tested[key] == second[key], key  # CocoMetric rounds to 3 decimals
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
    # ParamSyncCheckHook (in the tiny config) hashed every parameter on both ranks after
    # training and found them bit-identical (it raises otherwise).
    assert "parameters identical on all 2 ranks after training" in log, log[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_amp_without_gpu_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "tools/train.py", str(TINY), "--work-dir", str(tmp_path), "--amp"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--amp needs a GPU" in result.stderr


def test_cascade_train_evaluate_and_test(shapes_coco, tmp_path):
    work_dir = tmp_path / "cascade"
    log = run_tool([sys.executable, "tools/train.py", str(TINY_CASCADE), "--work-dir", str(work_dir)], shapes_coco)
    assert "Epoch(train) [1][4/4]" in log and "s2.loss_cls" in log and "s2.loss_bbox" in log
    trained = last_metrics(work_dir)
    log = run_tool([sys.executable, "tools/test.py", str(TINY_CASCADE), str(work_dir / "epoch_1.pth"),
                    "--work-dir", str(tmp_path / "test")], shapes_coco)
    tested = last_metrics_from_log(log)
    for key in ("coco/bbox_mAP", "coco/segm_mAP"):
        assert tested[key] == trained[key], key


# 3 epochs of 4 iterations, no validation (validation draws random numbers, which a run
# resumed from the checkpoint written before it would not).
LONG = ["--cfg-options", "train_cfg.max_epochs=3", "train_cfg.val_interval=100"]


def train_cmd(work_dir, *extra):
    return [sys.executable, "tools/train.py", str(TINY), "--work-dir", str(work_dir), *extra]


def assert_same_training_state(path_a, path_b):
    a, b = torch.load(path_a, map_location="cpu"), torch.load(path_b, map_location="cpu")
    assert (a["meta"]["epoch"], a["meta"]["iter"]) == (b["meta"]["epoch"], b["meta"]["iter"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for index in state_a:
        for name, value in state_a[index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[index][name])), (index, name)
    assert a["param_schedulers"] == b["param_schedulers"]


@pytest.fixture(scope="module")
def uninterrupted(shapes_coco, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("uninterrupted")
    run_tool(train_cmd(work_dir, *LONG), shapes_coco)
    return work_dir


def test_sigkill_mid_training_then_resume_continues_exactly(shapes_coco, uninterrupted, tmp_path):
    work_dir = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(work_dir, *LONG), cwd=REPO, env=tool_env(shapes_coco),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "Epoch(train) [2][2/4]" in line:  # half-way through epoch 2
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-50:])
    assert (work_dir / "epoch_1.pth").exists() and not (work_dir / "epoch_2.pth").exists()

    log = run_tool(train_cmd(work_dir, "--resume", *LONG), shapes_coco)
    assert "resumed epoch: 1, iter: 4" in log and "restored the random states" in log, log[-3000:]
    assert "Epoch(train) [1]" not in log and "Epoch(train) [3][4/4]" in log
    # Same weights, optimizer moments, step counts and schedulers as the run never killed.
    assert_same_training_state(uninterrupted / "epoch_3.pth", work_dir / "epoch_3.pth")


def test_kill_during_checkpoint_save_never_leaves_a_checkpoint_to_resume_from(shapes_coco, uninterrupted, tmp_path):
    work_dir = tmp_path / "crashed"
    crash = "default_hooks.checkpoint.backend_args.backend=crash_on_second_save"
    imports = "custom_imports.imports=[internimage.engine,internimage.datasets,crash_backend]"
    code, log = run_tool(train_cmd(work_dir, *LONG, crash, imports),
                         shapes_coco, expect_ok=False)
    assert code == -signal.SIGKILL, log[-3000:]
    names = sorted(p.name for p in work_dir.iterdir() if ".pth" in p.name)
    assert names[0] == "epoch_1.pth" and len(names) == 2 and names[1].startswith("epoch_2.pth.tmp-"), names
    assert (work_dir / "last_checkpoint").read_text().strip().endswith("epoch_1.pth")

    log = run_tool(train_cmd(work_dir, "--resume", *LONG), shapes_coco)
    assert "left by a checkpoint save that was interrupted" in log and "resumed epoch: 1, iter: 4" in log
    assert not list(work_dir.glob("*.tmp-*"))
    assert_same_training_state(uninterrupted / "epoch_3.pth", work_dir / "epoch_3.pth")


def test_non_finite_loss_stops_training_naming_iteration_and_terms(shapes_coco, tmp_path):
    work_dir = tmp_path / "nan"
    # An absurd learning rate: the first update sends the weights to infinity.
    code, log = run_tool(train_cmd(work_dir, "--cfg-options", "optim_wrapper.optimizer.lr=1e30"), shapes_coco,
                         expect_ok=False)
    assert code != 0
    match = re.search(r"FloatingPointError: non-finite loss at iteration (\d+) \(epoch 1, batch \d+/4\): (.*)", log)
    assert match, log[-3000:]
    assert int(match.group(1)) >= 2 and "loss_rpn_cls=" in match.group(2) and "loss_mask=" in match.group(2)
    assert not list(work_dir.glob("epoch_*.pth*"))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_detection_config_dataloaders_build_and_load(name, shapes_coco):
    """The real configs' train/val/test dataloaders (pipelines, samplers, collate) and
    evaluator, pointed at the synthetic COCO data, yield batches of the recipe's sizes."""
    import mmdet.evaluation  # noqa: F401  (registers CocoMetric)
    from mmdet.registry import METRICS
    from mmengine.runner import Runner

    cfg = Config.fromfile(str(REPO / "configs" / name))
    init_default_scope("mmdet")
    shapes = dict(classes=("circle", "square", "triangle"))
    for key, split in (("train_dataloader", "train"), ("val_dataloader", "val"), ("test_dataloader", "val")):
        loader_cfg = cfg[key]
        assert loader_cfg.dataset.type == "CheckedCocoDataset"
        loader_cfg.num_workers, loader_cfg.persistent_workers = 0, False
        loader_cfg.dataset.update(data_root=shapes_coco, metainfo=shapes,
                                  ann_file=f"annotations/instances_{split}.json", data_prefix=dict(img=f"{split}/"))
        # Random crops (3x recipe, negative crops allowed) can leave an image without objects:
        # look at a whole epoch (4 batches) and require objects somewhere.
        instances = 0
        for batch in Runner.build_dataloader(loader_cfg, seed=0):
            assert len(batch["inputs"]) == loader_cfg.batch_size
            for image, sample in zip(batch["inputs"], batch["data_samples"]):
                height, width = image.shape[-2:]
                if split == "train":
                    assert sample.gt_instances.masks.height == height
                    assert 384 <= min(height, width) <= 800 and max(height, width) <= 1333, (height, width)
                    instances += len(sample.gt_instances)
                else:
                    assert (height, width) == (800, 800)  # 64x64 images, 1333x800 keep-ratio resize
        assert split != "train" or instances > 0
    evaluator = cfg.val_evaluator
    evaluator.ann_file = shapes_coco + "annotations/instances_val.json"
    assert set(METRICS.build(evaluator).metrics) == {"bbox", "segm"}


@pytest.fixture
def broken_coco(shapes_coco, tmp_path):
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(shapes_coco, root)
    return root


def build_checked_coco(root, ann_file="annotations/instances_train.json", **kwargs):
    from mmdet.registry import DATASETS

    init_default_scope("mmdet")
    return DATASETS.build(dict(type="CheckedCocoDataset", data_root=str(root), ann_file=ann_file,
                               data_prefix=dict(img="train/"), metainfo=dict(classes=("circle", "square", "triangle")),
                               pipeline=[], **kwargs))


def test_checked_coco_loads_valid_data(broken_coco):
    dataset = build_checked_coco(broken_coco)
    assert len(dataset) == 8 and all(os.path.isfile(info["img_path"]) for info in dataset.data_list)


def test_missing_annotation_file_is_named(broken_coco):
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*annotations/instances_tran\.json"):
        build_checked_coco(broken_coco, ann_file="annotations/instances_tran.json")


def test_missing_image_is_named(broken_coco):
    os.remove(broken_coco / "train" / "000003.png")
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*instances_train\.json not found: "
                                                r".*train/000003\.png"):
        build_checked_coco(broken_coco)
    # Not checked where a storage backend reads the files, or when turned off.
    assert len(build_checked_coco(broken_coco, backend_args=dict(backend="local"))) == 8
    assert len(build_checked_coco(broken_coco, check_files=False)) == 8


@pytest.mark.parametrize("field, value, message", [
    ("image_id", 999, r"annotation id 2 refers to image id 999, which is not in the file's 'images'"),
    ("category_id", 7, r"annotation id 2 has category_id 7, which is not in the file's 'categories'"),
])
def test_annotation_with_unknown_id_is_named(broken_coco, field, value, message):
    path = broken_coco / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    coco["annotations"][1][field] = value
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"instances_train\.json: " + message):
        build_checked_coco(broken_coco)


def test_layer_decay_learning_rates_post_norm_variant():
    """The InternImage-L Cascade 3x config (post-norm, layer scale, 37 layers, rate 0.9),
    real size on the meta device: learning rates and weight decay of named parameters."""
    from mmdet.registry import MODELS
    from mmengine.optim import build_optim_wrapper

    cfg = Config.fromfile(str(REPO / "configs/cascade_mask_rcnn/cascade-mask-rcnn_internimage-l_fpn_3x_coco.py"))
    init_default_scope("mmdet")
    replace_sync_bn_with_bn(cfg)
    cfg.model.backbone.init_cfg = None
    with torch.device("meta"):
        model = MODELS.build(cfg.model)
    assert model.backbone.post_norm
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    lr_of, wd_of = {}, {}
    for group in wrapper.optimizer.param_groups:
        for name in group["param_names"]:
            lr_of[name], wd_of[name] = group["lr"], group["weight_decay"]
    total, rate, base_lr = 37 + 2, 0.9, 2e-4  # depths [5, 5, 22, 5]
    expected_ids = {
        "backbone.patch_embed.conv1.weight": 0,
        "backbone.levels.0.blocks.0.dcn.offset.weight": 1,
        "backbone.levels.0.blocks.4.norm2.0.weight": 5,  # post-norm: the norm after the MLP
        "backbone.levels.0.downsample.conv.weight": 6,
        "backbone.levels.1.blocks.0.gamma1": 6,
        "backbone.levels.2.blocks.21.mlp.fc2.weight": 32,
        "backbone.levels.2.downsample.norm.1.weight": 33,
        "backbone.levels.3.blocks.4.dcn.output_proj.weight": 37,
        "neck.fpn_convs.3.conv.weight": 38,
        "roi_head.bbox_head.2.fc_cls.weight": 38,
    }
    for name, lid in expected_ids.items():
        assert layer_id(name, total, [5, 5, 22, 5]) == lid, name
        assert lr_of[name] == pytest.approx(base_lr * rate ** (total - 1 - lid), rel=1e-12), name
    for name in ("backbone.levels.0.blocks.4.norm2.0.weight", "backbone.levels.1.blocks.0.gamma1",
                 "backbone.levels.2.downsample.norm.1.weight", "backbone.levels.3.blocks.4.dcn.output_proj.bias"):
        assert wd_of[name] == 0.0, name
    for name in ("backbone.levels.2.blocks.21.mlp.fc2.weight", "roi_head.bbox_head.2.fc_cls.weight"):
        assert wd_of[name] == 0.05, name
    assert lr_of["backbone.patch_embed.conv1.weight"] == pytest.approx(2e-4 * 0.9 ** 38)
