# Mask R-CNN + FPN, InternImage-T, 1x schedule (official: 47.2 box / 42.5 mask mAP).
# Official recipe in mmdet 3.x terms: AdamW lr 1e-4, weight decay 0.05, layer-wise lr
# decay (num_layers 30, rate 1.0), no gradient clipping, 2 images per GPU on 8 GPUs
# (auto_scale_lr scales the lr for other totals), a checkpoint every epoch (last 3
# kept) and the best bbox mAP kept.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['internimage', 'internimage.engine', 'internimage.datasets'], allow_failed_imports=False)
pretrained = 'internimage://internimage_t_1k_224'  # official release, see internimage/models/variants.py
model = dict(
    backbone=dict(
        _delete_=True,
        type='InternImage',
        arch='t',
        drop_path_rate=0.2,
        layer_scale=1.0,
        with_cp=False,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 512]))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='InternImageLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(num_layers=30, layer_decay_rate=1.0))
# CheckedCocoDataset: CocoDataset that names a missing annotation file, missing images and
# annotations referring to unknown image or category ids when it is built.
train_dataloader = dict(batch_size=2, num_workers=2, dataset=dict(type='CheckedCocoDataset'))
val_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
test_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
auto_scale_lr = dict(enable=True, base_batch_size=16)
# tools/train.py adds what makes a run safe to kill and resume (atomic checkpoint writes,
# NonFiniteLossHook, RandomStateHook): internimage.engine.runner_utils.make_training_reliable.
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3, save_best='coco/bbox_mAP', rule='greater'))
