# UperNet + InternImage on ADE20K, the official recipe in mmseg 1.x terms, at 512x512 with
# InternImage-T; variant configs override the backbone, the crop and the optimizer.
# AdamW (0.9, 0.999), weight decay 0.05, layer-wise lr decay, poly schedule (power 1.0 to
# 0) after 1500 linear warm-up iterations (ratio 1e-6), 160k iterations, 16 images in
# total (8 GPUs x 2), SyncBN in the heads (built as BN on machines without a GPU),
# auxiliary FCN head on stage 3. Label maps are checked (CheckSegLabels).
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['internimage', 'internimage.engine', 'internimage.datasets'], allow_failed_imports=False)
crop_size = (512, 512)
pretrained = 'internimage://internimage_t_1k_224'  # official release, see internimage/models/variants.py
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='InternImage',
        arch='t',
        drop_path_rate=0.2,
        layer_scale=1.0,
        with_cp=False,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150),
    test_cfg=dict(mode='whole'))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='CheckSegLabels', num_classes=150, ignore_index=255),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='CheckSegLabels', num_classes=150, ignore_index=255),
    dict(type='PackSegInputs'),
]
# Multi-scale + flip test (the *_ms configs): ratios of the (2048, 512) test scale.
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug',
         transforms=[
             [dict(type='Resize', scale=(int(2048 * r), int(512 * r)), keep_ratio=True)
              for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)],
             [dict(type='RandomFlip', prob=0.0, direction='horizontal'),
              dict(type='RandomFlip', prob=1.0, direction='horizontal')],
             [dict(type='LoadAnnotations', reduce_zero_label=True)],
             [dict(type='PackSegInputs')],
         ]),
]
train_dataloader = dict(batch_size=2, dataset=dict(type='CheckedADE20KDataset', pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(type='CheckedADE20KDataset', pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='InternImageLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(num_layers=30, layer_decay_rate=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=160000),
]
auto_scale_lr = dict(enable=False, base_batch_size=16)
# tools/train.py adds what makes a run safe to kill and resume (atomic checkpoint writes,
# NonFiniteLossHook, RandomStateHook): internimage.engine.runner_utils.make_training_reliable.
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=16000, max_keep_ckpts=3,
                                     save_best='mIoU', rule='greater'))
