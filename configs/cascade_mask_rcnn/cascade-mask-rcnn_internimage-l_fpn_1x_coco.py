# Cascade Mask R-CNN + FPN, InternImage-L (ImageNet-22k), 1x schedule (official: 54.9 / 47.7).
# Official recipe in mmdet 3.x terms: AdamW lr 1e-4, weight decay 0.05, layer-wise lr decay
# (num_layers 37, rate 0.94), gradient checkpointing in the backbone, the three bbox heads
# as 4-conv + 1-fc heads with SyncBN, class-specific GIoU regression; 2 images per GPU on
# 8 GPUs (auto_scale_lr for other totals), a checkpoint every epoch (last 3) and the best kept.
_base_ = ['mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['internimage', 'internimage.engine', 'internimage.datasets'], allow_failed_imports=False)
pretrained = 'internimage://internimage_l_22k_384'  # official release, see internimage/models/variants.py


def _bbox_head(stds):
    return dict(
        type='ConvFCBBoxHead',
        num_shared_convs=4,
        num_shared_fcs=1,
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0], target_stds=stds),
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


model = dict(
    backbone=dict(
        _delete_=True,
        type='InternImage',
        arch='l',
        drop_path_rate=0.4,
        layer_scale=1.0,
        with_cp=True,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[160, 320, 640, 1280]),
    roi_head=dict(bbox_head=[
        _bbox_head([0.1, 0.1, 0.2, 0.2]),
        _bbox_head([0.05, 0.05, 0.1, 0.1]),
        _bbox_head([0.033, 0.033, 0.067, 0.067]),
    ]))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='InternImageLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(num_layers=37, layer_decay_rate=0.94))
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
