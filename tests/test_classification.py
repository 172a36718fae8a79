"""ImageNet classification with mmpretrain: the configs state the official recipes; the
classification layer-decay rule; the checked ImageNet dataset's errors; and, on a tiny model
and synthetic shapes in the ImageNet folder layout, pre-training to fine-tuning through the
project's tools: train (Mixup/CutMix, EMA), resume, test, publish, an official-format file
evaluated with flip TTA, and the published file as the backbone of a Mask R-CNN."""
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml
from mmengine.config import Config
from mmengine.registry import init_default_scope

import internimage  # noqa: F401
import internimage.datasets  # noqa: F401  (CheckedImageNet, ClassCountCheckHook)
import internimage.engine  # noqa: F401
from internimage.datasets.synthetic import make_coco_shapes
from internimage.models.variants import pretrained_url

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "classification"
TINY = REPO / "tests" / "configs" / "internimage-tiny_imagenet-shapes.py"
TINY_MASK_RCNN = REPO / "tests" / "configs" / "mask-rcnn_internimage-tiny_shapes.py"
CLASSES = ("circle", "square", "triangle")

# The official recipes (RECIPES.md, classification/configs/*.yaml), one row per config:
# arch, size, epochs, warm-up epochs, lr at the total batch (BASE_LR * total / 512), total
# batch = GPUs x per-GPU batch, drop path, layer scale, label smoothing, Mixup, CutMix,
# erasing, layer decay, DCN_LR_MUL, with_cp, start checkpoint.
RECIPES = {
    "internimage-t_in1k-224.py": ("t", 224, 300, 20, 5e-4 * 4096 / 512, (32, 128), 0.1, None, 0.1, 0.8, 1.0, 0.25,
                                  None, None, False, None),
    "internimage-s_in1k-224.py": ("s", 224, 300, 20, 5e-4 * 4096 / 512, (32, 128), 0.4, 1e-5, 0.1, 0.8, 1.0, 0.25,
                                  None, None, False, None),
    "internimage-b_in1k-224.py": ("b", 224, 300, 20, 5e-4 * 4096 / 512, (32, 128), 0.5, 1e-5, 0.1, 0.8, 1.0, 0.25,
                                  None, None, False, None),
    "internimage-l_in22k-pre_in1k-384.py": ("l", 384, 20, 2, 2e-5, (32, 16), 0.1, 1e-5, 0.3, 0, 0, 0, 0.9, 0.1, True,
                                            "internimage_l_22k_384"),
    "internimage-xl_in22k-pre_in1k-384.py": ("xl", 384, 20, 2, 2e-5, (32, 16), 0.2, 1e-5, 0.3, 0, 0, 0, 0.9, 0.1,
                                             True, "internimage_xl_22k_384"),
    "internimage-h_in22k-pre_in1k-640.py": ("h", 640, 20, 2, 2e-5, (32, 16), 0.2, None, 0.3, 0, 0, 0, 0.9, 0.1, True,
                                            "internimage_h_jointto22k_384"),
    "internimage-g_in22k-pre_in1k-512.py": ("g", 512, 20, 2, 2e-5, (64, 8), 0.4, None, 0.3, 0, 0, 0, 0.9, 0.1, True,
                                            "internimage_g_pretrainto22k_384"),
}
# Official start files of the fine-tuning recipes (RECIPES.md), as the release names resolve.
START_FILES = {"internimage_l_22k_384": "internimage_l_22k_192to384.pth",
               "internimage_xl_22k_384": "internimage_xl_22k_192to384.pth",
               "internimage_h_jointto22k_384": "internimage_h_jointto22k_384.pth",
               "internimage_g_pretrainto22k_384": "internimage_g_pretrainto22k_384.pth"}


def test_every_classification_config_is_listed_and_in_the_metafile():
    assert {p.name for p in CONFIGS.glob("*.py")} == set(RECIPES)
    models = yaml.safe_load((CONFIGS / "metafile.yml").read_text())["Models"]
    assert sorted(Path(m["Config"]).name for m in models) == sorted(RECIPES)


def _transform(pipeline, name):
    found = [t for t in pipeline if t["type"] == name]
    return found[0] if found else None


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_classification_config_states_the_official_recipe(name):
    (arch, size, epochs, warmup, lr, (gpus, per_gpu), drop_path, layer_scale, smoothing, mixup, cutmix, erasing,
     layer_decay, dcn_lr_mul, with_cp, start) = RECIPES[name]
    cfg = Config.fromfile(str(CONFIGS / name))
    model = cfg.model
    assert (model.type, model.backbone.type, model.head.type) == ("ImageClassifier", "InternImageClsBackbone",
                                                                 "ClsHead")
    backbone = model.backbone
    assert (backbone.arch, backbone.drop_path_rate, backbone.layer_scale, backbone.with_cp, backbone.num_classes) \
        == (arch, drop_path, layer_scale, with_cp, 1000)
    assert model.head.loss == dict(type="LabelSmoothLoss", label_smooth_val=smoothing, mode="original",
                                   num_classes=1000)
    assert model.data_preprocessor.num_classes == 1000 and model.data_preprocessor.to_rgb
    if mixup:
        assert model.train_cfg == dict(augments=[dict(type="Mixup", alpha=mixup), dict(type="CutMix", alpha=cutmix)],
                                       probs=[0.5, 0.5])
    else:
        assert model.train_cfg is None
    if start is None:
        assert "init_cfg" not in backbone
    else:
        assert backbone.init_cfg == dict(type="Pretrained", checkpoint=f"internimage://{start}")
        assert pretrained_url(start).endswith("/" + START_FILES[start])
    # Optimizer, lr scaling, schedule.
    optim = cfg.optim_wrapper
    assert optim.optimizer.type == "AdamW" and optim.optimizer.lr == pytest.approx(lr)
    assert (optim.optimizer.betas, optim.optimizer.eps, optim.optimizer.weight_decay) == ((0.9, 0.999), 1e-8, 0.05)
    assert optim.clip_grad == dict(max_norm=5.0)
    assert cfg.train_dataloader.batch_size == per_gpu
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=gpus * per_gpu)
    if layer_decay is None:
        assert optim.paramwise_cfg == dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0)
    else:
        assert optim.constructor == "InternImageLayerDecayOptimizerConstructor"
        assert optim.paramwise_cfg == dict(decay_rule="classification", layer_decay_rate=layer_decay,
                                           dcn_lr_mul=dcn_lr_mul)
    assert cfg.train_cfg.max_epochs == epochs
    warm, cosine = cfg.param_scheduler
    assert (warm.type, warm.begin, warm.end, warm.convert_to_iter_based) == ("LinearLR", 0, warmup, True)
    assert (cosine.type, cosine.begin, cosine.end, cosine.convert_to_iter_based) == ("CosineAnnealingLR", warmup,
                                                                                     epochs, True)
    if start is None:  # warm-up from 5e-7 and minimum 5e-6 at BASE_LR 5e-4, scaled with it
        assert (warm.start_factor, cosine.eta_min_ratio) == (1e-3, 1e-2)
    else:  # WARMUP_LR 0, MIN_LR 0
        assert warm.start_factor <= 1e-6 and cosine.eta_min == 0.0
    ema = [h for h in cfg.custom_hooks if h.type == "EMAHook"]
    assert len(ema) == 1 and ema[0].momentum == pytest.approx(1 - 0.9999) and ema[0].update_buffers
    assert any(h.type == "ClassCountCheckHook" for h in cfg.custom_hooks)
    # Pipelines: bicubic everywhere, RandAugment m9 mstd0.5 increasing, erasing, test transform.
    train = cfg.train_dataloader.dataset.pipeline
    crop = _transform(train, "RandomResizedCrop")
    assert (crop.scale, crop.interpolation) == (size, "bicubic")
    rand_augment = _transform(train, "RandAugment")
    assert (rand_augment.policies, rand_augment.num_policies, rand_augment.magnitude_level,
            rand_augment.magnitude_std, rand_augment.hparams.interpolation) == ("timm_increasing", 2, 9, 0.5, "bicubic")
    erase = _transform(train, "RandomErasing")
    assert (erase.erase_prob if erase else 0) == erasing
    assert erase is None or (erase.mode, erase.min_area_ratio, erase.max_area_ratio) == ("rand", 0.02, 1 / 3)
    test = cfg.test_dataloader.dataset.pipeline
    assert cfg.train_dataloader.dataset.type == cfg.test_dataloader.dataset.type == "CheckedImageNet"
    if size == 224:
        assert (_transform(test, "ResizeEdge").scale, _transform(test, "CenterCrop").crop_size) == (256, 224)
    else:
        assert _transform(test, "Resize").scale == (size, size) and _transform(test, "CenterCrop") is None
    assert all(t.get("interpolation", "bicubic") == "bicubic" for t in test)
    assert cfg.test_evaluator == dict(type="Accuracy", topk=(1, 5))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_classification_config_builds_with_the_official_keys(name):
    """The model (meta device) has the official keys and shapes under `backbone.`."""
    import json

    from mmpretrain.registry import MODELS

    official = json.loads((REPO / "tests" / "data" / "official" / "official_state_dict_shapes.json").read_text())
    cfg = Config.fromfile(str(CONFIGS / name))
    init_default_scope("mmpretrain")
    cfg.model.backbone.pop("init_cfg", None)
    with torch.device("meta"):
        model = MODELS.build(cfg.model)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("data_preprocessor.")}
    assert shapes == {"backbone." + k: v for k, v in official[RECIPES[name][0]]["state_dict"].items()}


def test_classification_layer_decay_rule_and_dcn_lr_multiplier():
    """The official classification rule (block k of N: rate^(N-1-k); stem as the first
    block; downsample/norm as the next stage's first block; the rest 1.0) and DCN_LR_MUL on
    the names the official code lists (offset, not the mask projection)."""
    from mmengine.optim import build_optim_wrapper
    from mmpretrain.registry import MODELS

    cfg = Config.fromfile(str(CONFIGS / "internimage-l_in22k-pre_in1k-384.py"))
    init_default_scope("mmpretrain")
    cfg.model.backbone = dict(type="InternImageClsBackbone", channels=16, depths=[1, 1, 2, 1],
                              groups=[1, 2, 4, 8], num_classes=3, center_feature_scale=True)
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    lr_of, wd_of = {}, {}
    for group in wrapper.optimizer.param_groups:
        for name in group["param_names"]:
            lr_of[name], wd_of[name] = group["lr"], group["weight_decay"]
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)
    base, rate = 2e-5, 0.9  # 5 blocks: k = 0..4
    expected = {
        "backbone.patch_embed.conv1.weight": rate ** 4,
        "backbone.levels.0.blocks.0.mlp.fc1.weight": rate ** 4,
        "backbone.levels.0.downsample.conv.weight": rate ** 3,
        "backbone.levels.0.norm.0.weight": rate ** 3,
        "backbone.levels.1.blocks.0.dcn.input_proj.weight": rate ** 3,
        "backbone.levels.1.downsample.conv.weight": rate ** 2,
        "backbone.levels.2.blocks.1.dcn.mask.weight": rate ** 1,  # DCN_LR_MUL does not list `mask`
        "backbone.levels.2.blocks.1.dcn.offset.weight": rate ** 1 * 0.1,
        "backbone.levels.2.blocks.0.dcn.center_feature_scale_proj_weight": rate ** 2 * 0.1,
        "backbone.levels.2.downsample.conv.weight": 1.0,
        "backbone.levels.3.blocks.0.dcn.offset.bias": 0.1,
        "backbone.levels.3.norm.0.weight": 1.0,
        "backbone.conv_head.0.weight": 1.0,
        "backbone.head.weight": 1.0,
    }
    for name, scale in expected.items():
        assert lr_of[name] == pytest.approx(base * scale), name
    assert wd_of["backbone.levels.2.blocks.1.dcn.offset.weight"] == 0.05
    assert wd_of["backbone.head.weight"] == 0.05
    for name in ("backbone.head.bias", "backbone.levels.3.norm.0.weight", "backbone.conv_head.1.0.weight"):
        assert wd_of[name] == 0.0, name


def test_official_keys_load_into_the_image_classifier():
    """The wrapper's pre-hook maps official keys (also `{'model': sd}`, as mmengine's
    load_checkpoint passes such a file) to `backbone.`; the outputs match the official model."""
    from mmengine.runner.checkpoint import _load_checkpoint_to_model
    from mmpretrain.models import ImageClassifier

    data = torch.load(REPO / "tests" / "data" / "official" / "tiny_t_style.pt", weights_only=True)
    kwargs = {k: v for k, v in data["config"].items()}
    model = ImageClassifier(backbone=dict(type="InternImageClsBackbone", **kwargs), head=dict(type="ClsHead"))
    model.double().eval()
    for checkpoint in ({"model": data["state_dict"]}, data["state_dict"], {"state_dict": data["state_dict"]}):
        for p in model.parameters():
            p.data.zero_()
        _load_checkpoint_to_model(model, checkpoint, strict=True)
        with torch.no_grad():
            logits = model(data["input"], mode="tensor")
        torch.testing.assert_close(logits, data["logits"], rtol=1e-6, atol=1e-6)


# --- checked ImageNet ------------------------------------------------------------------


def make_imagenet_shapes(root, per_class=4, splits=("train", "val"), size=40, seed=0):
    """One shape per image, the class folder named after it (ImageNet folder layout)."""
    from internimage.datasets.synthetic import _background, _draw

    rng = np.random.default_rng(seed)
    for split in splits:
        for label, shape in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, shape), exist_ok=True)
            for i in range(per_class):
                image = _background(rng, size)
                mask = np.zeros((size, size), np.uint8)
                radius = rng.uniform(0.25, 0.4) * size
                cx, cy = rng.uniform(radius, size - radius, size=2)
                _draw(shape, mask, cx, cy, radius, rng.uniform(0, 2 * np.pi))
                image[mask.astype(bool)] = rng.integers(0, 256, size=3)
                cv2.imwrite(os.path.join(root, split, shape, f"{shape}_{label}{i:03d}.png"), image)
    return str(root) + "/"


@pytest.fixture(scope="module")
def shapes_imagenet(tmp_path_factory):
    return make_imagenet_shapes(tmp_path_factory.mktemp("shapes_imagenet"))


@pytest.fixture
def imagenet_copy(shapes_imagenet, tmp_path):
    import shutil

    shutil.copytree(shapes_imagenet, tmp_path / "imagenet")
    return tmp_path / "imagenet"


def build_imagenet(root, split="train", pipeline=(), **kwargs):
    from mmpretrain.registry import DATASETS

    init_default_scope("mmpretrain")
    kwargs.setdefault("metainfo", dict(classes=CLASSES))
    return DATASETS.build(dict(type="CheckedImageNet", data_root=str(root), split=split, pipeline=list(pipeline),
                               **kwargs))


def infos(dataset):
    return [dataset.get_data_info(i) for i in range(len(dataset))]


def test_checked_imagenet_loads_both_layouts(imagenet_copy):
    dataset = build_imagenet(imagenet_copy)
    assert len(dataset) == 12 and dataset.metainfo["classes"] == CLASSES
    assert sorted({info["gt_label"] for info in infos(dataset)}) == [0, 1, 2]
    os.makedirs(imagenet_copy / "meta")
    lines = [f"{Path(i['img_path']).parent.name}/{Path(i['img_path']).name} {i['gt_label']}" for i in infos(dataset)]
    (imagenet_copy / "meta" / "train.txt").write_text("\n".join(lines) + "\n")
    from_file = build_imagenet(imagenet_copy)
    assert from_file.ann_file.endswith("train.txt")
    assert [i["gt_label"] for i in infos(from_file)] == [i["gt_label"] for i in infos(dataset)]


def test_empty_class_folder_is_named(imagenet_copy):
    for image in (imagenet_copy / "train" / "square").iterdir():
        image.unlink()
    with pytest.raises(ValueError, match=r"1 class folder\(s\) of .*train contain no image .*: square"):
        build_imagenet(imagenet_copy)
    assert len(build_imagenet(imagenet_copy, allow_empty_classes=True)) == 8


def test_class_folders_that_do_not_match_the_classes_are_an_error(imagenet_copy):
    with pytest.raises(ValueError, match=r"has 3 class folders \(circle, square, triangle\) but the dataset has "
                                         r"1000 classes \(metainfo\['classes'\], the ImageNet-1k names\)"):
        build_imagenet(imagenet_copy, metainfo=None)
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*trian"):
        build_imagenet(imagenet_copy, data_prefix="trian")


def test_annotation_file_errors_are_named(imagenet_copy):
    os.makedirs(imagenet_copy / "meta")
    (imagenet_copy / "meta" / "train.txt").write_text("circle/circle_0000.png 0\nsquare/square_1000.png 7\n")
    with pytest.raises(ValueError, match=r"train\.txt, line 2: label 7 is outside \[0, 3\)"):
        build_imagenet(imagenet_copy)
    (imagenet_copy / "meta" / "train.txt").write_text("circle/circle_0000.png 0\nsquare/missing.png 1\n")
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*train\.txt not found: .*missing\.png"):
        build_imagenet(imagenet_copy)


def test_unreadable_image_is_named_then_skipped_in_training_only(imagenet_copy):
    broken = imagenet_copy / "train" / "circle" / "circle_0001.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated PNG
    index = next(i for i, info in enumerate(infos(build_imagenet(imagenet_copy)))
                 if info["img_path"].endswith("circle_0001.png"))
    dataset = build_imagenet(imagenet_copy, pipeline=[dict(type="CheckedLoadImageFromFile")])
    with pytest.raises(ValueError, match=r"image .*circle_0001\.png is truncated"):
        dataset[index]
    skipping = build_imagenet(imagenet_copy, pipeline=[dict(type="CheckedLoadImageFromFile", ignore_empty=True)])
    sample = skipping[index]  # training: another image instead, with a warning naming this one
    assert not sample["img_path"].endswith("circle_0001.png")
    testing = build_imagenet(imagenet_copy, pipeline=[dict(type="CheckedLoadImageFromFile", ignore_empty=True)],
                             test_mode=True)
    with pytest.raises(ValueError, match=r"circle_0001\.png \(index \d+\) could not be loaded, and an evaluation "
                                         r"does not skip images"):
        testing[index]


def test_model_class_count_that_does_not_match_the_dataset_is_an_error(imagenet_copy):
    from mmpretrain.registry import HOOKS, MODELS

    init_default_scope("mmpretrain")
    model = MODELS.build(dict(type="ImageClassifier", data_preprocessor=dict(num_classes=1000),
                              backbone=dict(type="InternImageClsBackbone", channels=16, depths=[1, 1, 2, 1],
                                            groups=[1, 2, 4, 8], num_classes=1000),
                              head=dict(type="ClsHead", loss=dict(type="LabelSmoothLoss", label_smooth_val=0.1))))
    hook = HOOKS.build(dict(type="ClassCountCheckHook"))
    runner = SimpleNamespace(model=model, train_dataloader=SimpleNamespace(dataset=build_imagenet(imagenet_copy)))
    with pytest.raises(ValueError, match=r"has num_classes=1000, but the CheckedImageNet at .* has 3 classes; "
                                         r"set model.backbone.num_classes"):
        hook.before_train(runner)


# --- end to end through the tools -------------------------------------------------------


def tool_env(**extra):
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), **extra)


def run_tool(args, env, timeout=600):
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def top1(log):
    found = re.findall(r"accuracy/top1: ([0-9.]+)", log)
    assert found, log[-3000:]
    return float(found[-1])


def test_pretrain_resume_test_publish_then_finetune_a_detector(shapes_imagenet, tmp_path):
    env = tool_env(INTERNIMAGE_SHAPES_IMAGENET=shapes_imagenet)
    work = tmp_path / "cls"
    # 12 images, 4 per batch: 3 iterations per epoch, Mixup/CutMix soft targets, EMA.
    log = run_tool(["tools/train.py", str(TINY), "--work-dir", str(work)], env)
    assert "Epoch(train) [1][3/3]" in log and "accuracy/top1" in log and "accuracy/top2" in log
    assert (work / "epoch_1.pth").exists()
    first = torch.load(work / "epoch_1.pth", map_location="cpu", weights_only=False)
    assert "ema_state_dict" in first and any(k.startswith("backbone.levels.") for k in first["state_dict"])

    log = run_tool(["tools/train.py", str(TINY), "--work-dir", str(work), "--resume",
                    "--cfg-options", "train_cfg.max_epochs=2"], env)
    assert re.search(r"resumed epoch: 1, iter: 3", log), log[-3000:]
    assert "Epoch(train) [2][3/3]" in log and "Epoch(train) [1]" not in log
    validated = top1(log)

    # tools/test.py on the last checkpoint: the EMA weights, the same top-1 as the validation.
    log = run_tool(["tools/test.py", str(TINY), str(work / "epoch_2.pth"), "--work-dir", str(tmp_path / "test")],
                   env)
    assert top1(log) == validated and "accuracy/top2" in log

    log = run_tool(["tools/publish_model.py", str(work / "epoch_2.pth"), str(tmp_path / "tiny_cls.pth")], env)
    published = next(tmp_path.glob("tiny_cls-*.pth"))
    state = torch.load(published, map_location="cpu", weights_only=True)["state_dict"]
    assert set(state) == set(first["state_dict"])

    # Fine-tune: the published classifier initialises the backbone of the tiny Mask R-CNN.
    coco = tmp_path / "coco"
    make_coco_shapes(str(coco), num_train=2, num_val=2, size=64, seed=0)
    log = run_tool(["tools/train.py", str(TINY_MASK_RCNN), "--work-dir", str(tmp_path / "det"), "--cfg-options",
                    "model.backbone.mlp_ratio=4.0", "model.backbone.init_cfg._delete_=True",
                    "model.backbone.init_cfg.type=Pretrained", f"model.backbone.init_cfg.checkpoint={published}",
                    "train_dataloader.batch_size=2", "train_cfg.val_interval=100"],
                   tool_env(INTERNIMAGE_SHAPES_COCO=str(coco) + "/"))
    assert f"Loading InternImage backbone weights from {published}" in log, log[-3000:]
    assert "Missing keys" not in log and "Epoch(train) [1][1/1]" in log


def test_official_classification_file_evaluates_with_flip_tta(shapes_imagenet, tmp_path):
    """`{'model': official state dict}` as released, straight into tools/test.py (+ --tta):
    the scores are the average of the official model's softmax on the image and its flip."""
    from mmengine.dataset import Compose
    from mmpretrain.registry import MODELS

    data = torch.load(REPO / "tests" / "data" / "official" / "tiny_t_style.pt", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in data["state_dict"].items()}
    state["head.weight"], state["head.bias"] = state["head.weight"][:3], state["head.bias"][:3]
    official = tmp_path / "internimage_tiny_1k_32.pth"
    torch.save({"model": state}, official)
    preds = tmp_path / "preds.pkl"
    log = run_tool(["tools/test.py", str(TINY), str(official), "--tta", "--out", str(preds),
                    "--work-dir", str(tmp_path / "test")],
                   tool_env(INTERNIMAGE_SHAPES_IMAGENET=shapes_imagenet))
    assert "accuracy/top1" in log
    import mmengine

    results = mmengine.load(str(preds))
    assert len(results) == 12  # every val image once (its two views averaged)
    cfg = Config.fromfile(str(TINY))
    init_default_scope("mmpretrain")
    model = internimage.InternImageClassifier(**data["config"] | dict(num_classes=3)).eval()
    model.load_state_dict({k: v for k, v in state.items()})
    preprocessor = MODELS.build(cfg.model.data_preprocessor)
    pipeline = Compose(cfg.test_dataloader.dataset.pipeline)
    for result in results:
        inputs = preprocessor(dict(inputs=[pipeline(dict(img_path=result["img_path"]))["inputs"]]))["inputs"]
        with torch.no_grad():
            scores = (model(inputs).softmax(-1) + model(inputs.flip(-1)).softmax(-1)) / 2
        torch.testing.assert_close(result["pred_score"], scores[0], rtol=1e-4, atol=1e-5)
