"""DINO (mmdet 3.x) and Mask2Former (mmseg 1.x) with InternImage: the published configs
build on the meta device with the official recipe and parameter counts; the layer-decay
constructor gives everything outside the backbone the top layer id; tiny models train and
test through tools/train.py and tools/test.py on synthetic data."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

import internimage  # noqa: F401
from internimage.datasets.synthetic import make_ade_shapes, make_coco_shapes
from internimage.engine.runner_utils import replace_sync_bn_with_bn
from internimage.models.backbone import resolve_arch
from internimage.models.variants import ARCH_KEYS

REPO = Path(__file__).resolve().parents[1]
TINY_DINO = REPO / "tests" / "configs" / "dino-4scale_internimage-tiny_shapes.py"
TINY_M2F = REPO / "tests" / "configs" / "mask2former_internimage-tiny_shapes.py"
M2F_H = "mask2former/mask2former_internimage-h_896_80k_cocostuff2ade20k_ss.py"
M2F_T = "mask2former/mask2former_internimage-t_512_160k_ade20k.py"  # not an official recipe

# config -> (arch, drop_path, offset_scale, post_norm, with_cp, weight decay, paramwise_cfg,
#            detections per image, published params)
DINO = {
    "dino/dino-4scale_internimage-t_layer-wise-lr_1x_coco.py":
        ("t", 0.2, 1.0, False, True, 1e-4, dict(num_layers=30, layer_decay_rate=0.9), 100, 49e6),
    "dino/dino-4scale_internimage-l_layer-wise-lr_1x_coco.py":
        ("l", 0.4, 2.0, True, False, 1e-4, dict(num_layers=37, layer_decay_rate=0.9), 300, 241e6),
    "dino/dino-4scale_internimage-l_0.1x-backbone-lr_1x_coco.py":
        ("l", 0.4, 2.0, True, False, 0.05, dict(custom_keys={"backbone": dict(lr_mult=0.1)}), 300, 241e6),
}
# Objects365 -> COCO: config -> (arch, num_layers). The official COCO table publishes no
# parameter count for these two (its DINO-H row, 2.18B, is the composite-backbone
# CB-InternImage-H model), so the built counts are recorded in BUILT.
DINO_O365 = {
    "dino/dino-4scale_internimage-h_objects365-pre_coco.py": ("h", 50),
    "dino/dino-4scale_internimage-g_objects365-pre_coco.py": ("g", 56),
}
# The parameter counts the configs build to (within 1% of the published ones, where published).
BUILT = {"t": 48_736_828, "l": 241_033_214, "mask2former-h": 1_313_496_135, "dino-h": 1_098_725_884,
         "dino-g": 3_082_611_660}


def build_on_meta(cfg):
    from mmengine.registry import MODELS

    init_default_scope(cfg.default_scope)
    replace_sync_bn_with_bn(cfg)
    cfg.model.backbone.init_cfg = None
    with torch.device("meta"):
        return MODELS.build(cfg.model)


def test_every_config_is_listed():
    found = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").glob("dino/*.py")}
    assert found == set(DINO) | set(DINO_O365)
    found = {p.name for p in (REPO / "configs" / "mask2former").glob("*.py")}
    assert found == {Path(M2F_H).name, Path(M2F_H).name.replace("_ss.py", "_ms.py"), Path(M2F_T).name}


def test_mask2former_t_config_is_mmsegs_recipe_on_internimage_t():
    """The unofficial T-size config: mmseg's Mask2Former ADE20K 512 recipe, InternImage-T backbone."""
    cfg = Config.fromfile(str(REPO / "configs" / M2F_T))
    backbone, head = cfg.model.backbone, cfg.model.decode_head
    assert (backbone.type, backbone.arch, backbone.drop_path_rate, backbone.layer_scale) == ("InternImage", "t", 0.2,
                                                                                            1.0)
    assert backbone.init_cfg.checkpoint == "internimage://internimage_t_1k_224"
    assert head.in_channels == [64, 128, 256, 512] and (head.feat_channels, head.num_queries) == (256, 100)
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys["backbone"].lr_mult == 0.1
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.dataset.type == "CheckedADE20KDataset"
    model = build_on_meta(cfg)
    with torch.device("meta"):
        reference = internimage.InternImage(arch="t", layer_scale=1.0)
    assert sum(p.numel() for p in model.backbone.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("name", sorted(DINO))
def test_dino_config_builds_with_official_recipe(name):
    arch_name, drop_path, offset_scale, post_norm, with_cp, wd, paramwise, max_per_img, params = DINO[name]
    cfg = Config.fromfile(str(REPO / "configs" / name))
    backbone = cfg.model.backbone
    arch = resolve_arch(backbone.arch, **{k: backbone.get(k) for k in ARCH_KEYS})
    assert (backbone.type, backbone.arch, backbone.drop_path_rate, arch["offset_scale"], arch["post_norm"],
            backbone.with_cp, backbone.out_indices) == ("InternImage", arch_name, drop_path, offset_scale,
                                                         post_norm, with_cp, (1, 2, 3))
    assert backbone.init_cfg.type == "Pretrained" and backbone.init_cfg.checkpoint.startswith("internimage://")
    model = cfg.model
    assert model.type == "DINO" and model.num_queries == 900 and model.as_two_stage and model.with_box_refine
    assert model.neck.type == "ChannelMapper" and model.neck.in_channels == [arch["channels"] * 2 ** i
                                                                             for i in (1, 2, 3)]
    assert (model.neck.out_channels, model.neck.num_outs, model.neck.norm_cfg) == (256, 4, dict(type="GN",
                                                                                                num_groups=32))
    assert model.encoder.num_layers == model.decoder.num_layers == 6
    assert model.dn_cfg.group_cfg.num_dn_queries == 100 and model.dn_cfg.label_noise_scale == 0.5
    assert model.test_cfg.max_per_img == max_per_img
    optim = cfg.optim_wrapper
    assert (optim.optimizer.type, optim.optimizer.lr, optim.optimizer.weight_decay) == ("AdamW", 1e-4, wd)
    assert optim.clip_grad == dict(max_norm=0.1, norm_type=2) and optim.paramwise_cfg == paramwise
    assert optim.get("constructor") == ("InternImageLayerDecayOptimizerConstructor"
                                        if "num_layers" in paramwise else None)
    assert cfg.train_cfg.max_epochs == 12
    warmup, step = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end) == ("LinearLR", 1e-3, 500)
    assert (step.type, step.milestones, step.gamma) == ("MultiStepLR", [11], 0.1)
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    crop = cfg.train_dataloader.dataset.pipeline[3].transforms[1][1]
    assert (crop.type, crop.crop_size, crop.allow_negative_crop) == ("RandomCrop", (384, 600), False)

    built = build_on_meta(cfg)
    count = sum(p.numel() for p in built.parameters())
    assert abs(count - params) / params < 0.01 and count == BUILT[arch_name], count


@pytest.mark.parametrize("name", sorted(DINO_O365))
def test_dino_objects365_configs_build_with_official_recipe(name):
    arch_name, num_layers = DINO_O365[name]
    cfg = Config.fromfile(str(REPO / "configs" / name))
    backbone = cfg.model.backbone
    assert (backbone.arch, backbone.drop_path_rate, backbone.layer_scale, backbone.with_cp, backbone.out_indices) == (
        arch_name, 0.5, None, True, (1, 2, 3))
    arch = resolve_arch(arch_name)
    assert arch["center_feature_scale"] and arch["level2_post_norm"] and arch["dw_kernel_size"] == 5
    assert cfg.model.neck.in_channels == [arch["channels"] * 2 ** i for i in (1, 2, 3)]
    assert cfg.model.num_queries == 900 and cfg.model.dn_cfg.group_cfg.num_dn_queries == 1000
    assert cfg.model.test_cfg.max_per_img == 300
    optim = cfg.optim_wrapper
    assert (optim.optimizer.lr, optim.optimizer.weight_decay, optim.clip_grad.max_norm) == (1e-4, 1e-4, 0.1)
    assert optim.paramwise_cfg == dict(num_layers=num_layers, layer_decay_rate=0.94, offset_lr_scale=1e-3)
    assert cfg.train_cfg == dict(type="IterBasedTrainLoop", max_iters=20000, val_interval=200)
    assert [s.type for s in cfg.param_scheduler] == ["LinearLR"] and cfg.param_scheduler[0].end == 500
    assert cfg.train_dataloader.batch_size == 1
    assert cfg.train_dataloader.dataset.pipeline[3].scale == [(2000, 600), (2000, 1800)]
    assert cfg.test_dataloader.dataset.pipeline[1].scale == (2000, 1000)
    count = sum(p.numel() for p in build_on_meta(cfg).parameters())
    assert count == BUILT[f"dino-{arch_name}"], count


def test_mask2former_configs_build_with_official_recipe():
    cfg = Config.fromfile(str(REPO / "configs" / M2F_H))
    backbone, head = cfg.model.backbone, cfg.model.decode_head
    assert (backbone.arch, backbone.drop_path_rate, backbone.layer_scale, backbone.out_indices) == (
        "h", 0.5, None, (0, 1, 2, 3))
    assert resolve_arch("h")["center_feature_scale"] and resolve_arch("h")["dw_kernel_size"] == 5
    assert head.type == "Mask2FormerHead" and head.in_channels == [320, 640, 1280, 2560]
    assert (head.feat_channels, head.out_channels, head.num_queries) == (1024, 1024, 200)
    encoder = head.pixel_decoder.encoder
    assert encoder.num_layers == 6 and encoder.layer_cfg.self_attn_cfg.embed_dims == 1024
    assert head.transformer_decoder.num_layers == 9
    assert head.transformer_decoder.layer_cfg.cross_attn_cfg.embed_dims == 1024
    assert head.loss_cls.class_weight == [1.0] * 150 + [0.1]
    assert cfg.model.data_preprocessor.size == (896, 896) and cfg.model.test_cfg.mode == "whole"
    optim = cfg.optim_wrapper
    assert (optim.optimizer.lr, optim.optimizer.betas, optim.optimizer.weight_decay) == (1e-5, (0.9, 0.999), 0.05)
    assert optim.paramwise_cfg == dict(num_layers=50, layer_decay_rate=0.95)
    assert optim.clip_grad == dict(max_norm=0.1, norm_type=2)
    warmup, poly = cfg.param_scheduler
    assert (warmup.start_factor, warmup.end, poly.power, poly.eta_min, poly.end) == (1e-6, 1500, 1.0, 0.0, 80000)
    assert cfg.train_cfg.max_iters == 80000 and cfg.train_dataloader.batch_size == 1
    assert cfg.load_from.endswith("mask2former_internimage_h_896_80k_cocostuff164k.pth")

    count = sum(p.numel() for p in build_on_meta(cfg).parameters())
    assert abs(count - 1.31e9) / 1.31e9 < 0.01 and count == BUILT["mask2former-h"], count

    ms = Config.fromfile(str(REPO / "configs" / M2F_H.replace("_ss.py", "_ms.py")))
    assert ms.model.type == "SegTTAModel" and ms.model.module.decode_head.num_queries == 200
    resizes, flips = ms.test_dataloader.dataset.pipeline[1].transforms[:2]
    assert [r.scale for r in resizes] == [(3072, 768), (3328, 832), (3584, 896), (3840, 960), (4096, 1024)]
    assert [f.prob for f in flips] == [0.0, 1.0]


def learning_rates(config, optim_wrapper=None):
    from mmengine.registry import MODELS

    cfg = Config.fromfile(str(config))
    init_default_scope(cfg.default_scope)
    replace_sync_bn_with_bn(cfg)
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, optim_wrapper or cfg.optim_wrapper)
    name_of = {id(p): n for n, p in model.named_parameters()}
    lr_of, wd_of = {}, {}
    for group in wrapper.optimizer.param_groups:
        for param in group["params"]:  # the default constructor does not record names
            name = name_of[id(param)]
            lr_of[name] = group["lr"]
            wd_of[name] = group.get("weight_decay", wrapper.optimizer.defaults["weight_decay"])
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)
    return lr_of, wd_of


HEAD_PARAMS = {
    TINY_DINO: ["neck.convs.0.conv.weight", "encoder.layers.0.self_attn.sampling_offsets.weight",
                "decoder.layers.0.cross_attn.attention_weights.weight", "decoder.ref_point_head.layers.0.weight",
                "query_embedding.weight", "level_embed", "memory_trans_fc.weight",
                "dn_query_generator.label_embedding.weight", "bbox_head.cls_branches.0.weight"],
    TINY_M2F: ["decode_head.pixel_decoder.input_convs.0.conv.weight",
               "decode_head.pixel_decoder.encoder.layers.0.self_attn.sampling_offsets.weight",
               "decode_head.pixel_decoder.mask_feature.weight", "decode_head.transformer_decoder.post_norm.weight",
               "decode_head.query_embed.weight", "decode_head.query_feat.weight", "decode_head.level_embed.weight",
               "decode_head.cls_embed.weight"],
}


@pytest.mark.parametrize("config", [TINY_DINO, TINY_M2F], ids=["dino", "mask2former"])
def test_layer_decay_gives_everything_outside_the_backbone_the_top_layer(config):
    lr_of, wd_of = learning_rates(config)
    total, rate, base_lr = 5 + 2, 0.9, 1e-3  # num_layers 5 in the tiny configs, depths [1, 1, 2, 1]
    backbone = {"backbone.patch_embed.conv1.weight": 0, "backbone.levels.0.blocks.0.dcn.offset.weight": 1,
                "backbone.levels.2.blocks.1.mlp.fc1.weight": 4, "backbone.levels.3.norm.0.weight": 5}
    for name, lid in backbone.items():
        assert lr_of[name] == pytest.approx(base_lr * rate ** (total - 1 - lid)), name
    for name in HEAD_PARAMS[config]:
        assert lr_of[name] == pytest.approx(base_lr), name
    assert {n for n, lr in lr_of.items() if lr == pytest.approx(base_lr)} == {
        n for n in lr_of if not n.startswith("backbone.")}
    # Weight decay as in the official constructors: none for deformable attention's sampling
    # offsets, norms and biases; the embeddings and other matrices decay.
    offsets = [n for n in lr_of if "sampling_offsets" in n]
    assert offsets and all(wd_of[n] == 0.0 for n in offsets)
    wd = Config.fromfile(str(config)).optim_wrapper.optimizer.weight_decay
    for name in HEAD_PARAMS[config]:
        expected = 0.0 if "sampling_offsets" in name or "norm" in name else wd
        assert wd_of[name] == expected, name


def test_offset_lr_scale_scales_sampling_offsets_only():
    optim = Config.fromfile(str(TINY_DINO)).optim_wrapper
    optim.paramwise_cfg.offset_lr_scale = 1e-3
    lr_of, _ = learning_rates(TINY_DINO, optim)
    name = "encoder.layers.0.self_attn.sampling_offsets.weight"
    assert lr_of[name] == pytest.approx(1e-6)
    assert lr_of["encoder.layers.0.self_attn.attention_weights.weight"] == pytest.approx(1e-3)
    assert lr_of["backbone.levels.0.blocks.0.dcn.offset.weight"] == pytest.approx(1e-3 * 0.9 ** 5)


def test_dino_backbone_at_one_tenth_lr():
    optim = Config.fromfile(str(REPO / "configs" / "dino" / "dino-4scale_internimage-l_0.1x-backbone-lr_1x_coco.py"))
    lr_of, _ = learning_rates(TINY_DINO, optim.optim_wrapper)
    for name, lr in lr_of.items():
        assert lr == pytest.approx(1e-5 if name.startswith("backbone.") else 1e-4), name


def run_tool(args, env_extra, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra,
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "helpers")]))
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_tiny_dino_trains_and_tests(tmp_path):
    data = tmp_path / "shapes_coco"
    make_coco_shapes(str(data), num_train=4, num_val=2, size=64, seed=0)
    env = dict(INTERNIMAGE_SHAPES_COCO=str(data) + "/")
    work = tmp_path / "work"
    log = run_tool([sys.executable, "tools/train.py", str(TINY_DINO), "--work-dir", str(work)], env)
    assert "Epoch(train) [1][2/2]" in log and "dn_loss_cls" in log and "coco/bbox_mAP" in log
    val_map = re.findall(r"coco/bbox_mAP: ([0-9.]+)", log)[-1]
    log = run_tool([sys.executable, "tools/test.py", str(TINY_DINO), str(work / "epoch_1.pth"),
                    "--work-dir", str(tmp_path / "test")], env)
    assert re.findall(r"coco/bbox_mAP: ([0-9.]+)", log)[-1] == val_map  # the tools agree on the checkpoint
    log = run_tool([sys.executable, "tools/train.py", str(TINY_DINO), "--work-dir", str(work), "--resume",
                    "--cfg-options", "train_cfg.max_epochs=2"], env)
    assert re.search(r"resumed epoch: 1, iter: 2", log) and "Epoch(train) [2][2/2]" in log, log[-2000:]


def test_tiny_mask2former_trains_and_tests(tmp_path):
    data = tmp_path / "shapes_ade"
    make_ade_shapes(str(data), num_train=4, num_val=2, size=64, seed=0)
    env = dict(INTERNIMAGE_SHAPES_ADE=str(data) + "/")
    work = tmp_path / "work"
    log = run_tool([sys.executable, "tools/train.py", str(TINY_M2F), "--work-dir", str(work)], env)
    assert "Iter(train) [2/2]" in log and "decode.loss_dice" in log and "mIoU" in log
    val_miou = re.findall(r"mIoU: ([0-9.]+)", log)[-1]
    log = run_tool([sys.executable, "tools/test.py", str(TINY_M2F), str(work / "iter_2.pth"),
                    "--work-dir", str(tmp_path / "test")], env)
    assert re.findall(r"mIoU: ([0-9.]+)", log)[-1] == val_miou  # the tools agree on the checkpoint
    log = run_tool([sys.executable, "tools/train.py", str(TINY_M2F), "--work-dir", str(work), "--resume",
                    "--cfg-options", "train_cfg.max_iters=3"], env)
    assert re.search(r"resumed epoch: \d+, iter: 2", log) and "Iter(train) [3/3]" in log, log[-2000:]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_coco_shapes(str(root / "coco"), num_train=4, num_val=2, size=64, seed=0)
    make_ade_shapes(str(root / "ade"), num_train=4, num_val=2, size=64, seed=0)
    return dict(coco=str(root / "coco") + "/", ade=str(root / "ade") + "/")


@pytest.mark.parametrize("name", sorted(DINO) + sorted(DINO_O365) + [M2F_H, M2F_H.replace("_ss.py", "_ms.py"), M2F_T])
def test_config_dataloaders_build_on_synthetic_data(name, synthetic):
    """The real configs' train/val/test dataloaders (their pipelines, samplers and collate),
    pointed at the synthetic data, give batches of the recipe's size."""
    from mmengine.runner import Runner

    cfg = Config.fromfile(str(REPO / "configs" / name))
    detection = name.startswith("dino/")
    init_default_scope("mmdet" if detection else "mmseg")
    for key, split in (("train_dataloader", "train"), ("val_dataloader", "val"), ("test_dataloader", "val")):
        loader_cfg = cfg[key]
        loader_cfg.num_workers, loader_cfg.persistent_workers = 0, False
        if detection:
            loader_cfg.dataset.update(data_root=synthetic["coco"], metainfo=dict(classes=("circle", "square",
                                                                                            "triangle")),
                                      ann_file=f"annotations/instances_{split}.json", data_prefix=dict(img=f"{split}/"))
        else:
            loader_cfg.dataset.data_root = synthetic["ade"]
        batch = next(iter(Runner.build_dataloader(loader_cfg, seed=0)))
        if name.endswith("_ms.py") and key == "test_dataloader":  # test-time augmentation: 5 scales x 2 flips
            assert len(batch["inputs"]) == 10 and all(len(views) == loader_cfg.batch_size for views in batch["inputs"])
        else:
            assert len(batch["inputs"]) == loader_cfg.batch_size and batch["inputs"][0].shape[0] == 3
