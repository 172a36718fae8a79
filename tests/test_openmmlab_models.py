"""type='InternImage' inside an mmdet detector and an mmseg segmentor built from config dicts."""
import torch
from mmengine.registry import init_default_scope

import internimage  # noqa: F401

TINY_BACKBONE = dict(type="InternImage", core_op="DCNv3", channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8],
                     mlp_ratio=2.0, drop_path_rate=0.1, layer_scale=1.0, offset_scale=1.0, post_norm=False,
                     out_indices=(0, 1, 2, 3))


def base_model_config(tmp_path, base):
    from mmengine.config import Config

    path = tmp_path / "model_cfg.py"
    path.write_text(f"_base_ = ['{base}']\n")
    return Config.fromfile(str(path)).model


def test_mmdet_mask_rcnn_with_internimage_runs_forward(tmp_path):
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    init_default_scope("mmdet")
    cfg = base_model_config(tmp_path, "mmdet::_base_/models/mask-rcnn_r50_fpn.py")
    cfg.backbone = TINY_BACKBONE
    cfg.neck.in_channels = [16, 32, 64, 128]
    model = MODELS.build(cfg)
    model.init_weights()
    images = torch.rand(2, 3, 96, 128) * 255
    samples = []
    for _ in range(2):
        sample = DetDataSample(metainfo=dict(img_shape=(96, 128), ori_shape=(96, 128), pad_shape=(96, 128),
                                             batch_input_shape=(96, 128), scale_factor=(1.0, 1.0)))
        from mmdet.structures.mask import BitmapMasks

        masks = torch.zeros(1, 96, 128, dtype=torch.uint8)
        masks[0, 20:60, 30:90] = 1
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[30.0, 20.0, 90.0, 60.0]]),
                                           labels=torch.tensor([3]), masks=BitmapMasks(masks.numpy(), 96, 128))
        samples.append(sample)
    data = model.data_preprocessor(dict(inputs=list(images), data_samples=samples), training=True)
    losses = model(**data, mode="loss")
    total = sum(sum(v) if isinstance(v, list) else v for k, v in losses.items() if "loss" in k)
    total.backward()
    assert torch.isfinite(total)
    assert model.backbone.levels[0].blocks[0].dcn.input_proj.weight.grad is not None
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(dict(inputs=list(images), data_samples=samples)), mode="predict")
    assert len(results) == 2 and hasattr(results[0], "pred_instances")


def test_mmseg_upernet_with_internimage_runs_forward(tmp_path):
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    init_default_scope("mmseg")
    cfg = base_model_config(tmp_path, "mmseg::_base_/models/upernet_r50.py")
    cfg.pretrained = None
    cfg.backbone = TINY_BACKBONE
    cfg.decode_head.in_channels = [16, 32, 64, 128]
    cfg.decode_head.channels = 32
    cfg.decode_head.num_classes = 5
    cfg.auxiliary_head.in_channels = 64
    cfg.auxiliary_head.channels = 16
    cfg.auxiliary_head.num_classes = 5
    cfg.decode_head.norm_cfg = cfg.auxiliary_head.norm_cfg = dict(type="BN", requires_grad=True)
    cfg.data_preprocessor.size = (64, 64)
    model = MODELS.build(cfg)
    model.init_weights()
    images = torch.rand(2, 3, 64, 64) * 255
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 64, 64)))
        samples.append(sample)
    data = model.data_preprocessor(dict(inputs=list(images), data_samples=samples), training=True)
    losses = model(**data, mode="loss")
    total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()
    assert torch.isfinite(total)
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(dict(inputs=list(images), data_samples=samples)), mode="predict")
    assert results[0].pred_sem_seg.data.shape == (1, 64, 64)
