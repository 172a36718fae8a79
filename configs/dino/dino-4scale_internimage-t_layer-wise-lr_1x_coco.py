# DINO-4scale, InternImage-T, layer-wise lr decay, 1x schedule (official: 53.9 box mAP).
# mmdet 3.x's DINO (detector, DINOHead, CdnQueryGenerator) with the official recipe:
# AdamW lr 1e-4, weight decay 1e-4, layer-wise lr decay (num_layers 30, rate 0.9; the DINO
# transformer, query embeddings, neck and head all get the top layer id), gradient clipping
# 0.1, 500 linear warm-up iterations (ratio 1e-3), lr x0.1 after epoch 11, 12 epochs, 2
# images per GPU on 8 GPUs (auto_scale_lr scales the lr for other totals), 100 detections
# per image (T; L keeps 300). The transformer (6 + 6 layers of 256 dims, FFN 2048, no
# dropout, 900 queries, 100 denoising queries, focal/L1/GIoU losses and matching costs)
# comes from mmdet's base config unchanged. The training pipeline is the official one
# (flip, then multi-scale resize or resize -> absolute-range crop without negative crops ->
# resize; images without boxes skipped, padding to a multiple of 32); mmdet 3.x's own DINO
# recipe differs there (negative crops allowed, empty images kept, no padding).
# Official settings without an mmdet 3.x equivalent: none for T/L (the official
# CustomLayerDecayOptimizerConstructor is InternImageLayerDecayOptimizerConstructor here).
_base_ = ['mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py']
custom_imports = dict(imports=['internimage', 'internimage.engine', 'internimage.datasets'], allow_failed_imports=False)
pretrained = 'internimage://internimage_t_1k_224'  # official release, see internimage/models/variants.py
model = dict(
    num_queries=900,
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(
        _delete_=True,
        type='InternImage',
        arch='t',
        drop_path_rate=0.2,
        layer_scale=1.0,
        with_cp=True,
        out_indices=(1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512]),
    test_cfg=dict(max_per_img=100))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    constructor='InternImageLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(num_layers=30, layer_decay_rate=0.9))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[11], gamma=0.1),
]
multi_scale = [(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333), (672, 1333),
               (704, 1333), (736, 1333), (768, 1333), (800, 1333)]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomChoice',
         transforms=[
             [dict(type='RandomChoiceResize', scales=multi_scale, keep_ratio=True)],
             [dict(type='RandomChoiceResize', scales=[(400, 4200), (500, 4200), (600, 4200)], keep_ratio=True),
              dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=False),
              dict(type='RandomChoiceResize', scales=multi_scale, keep_ratio=True)],
         ]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=2,
    dataset=dict(type='CheckedCocoDataset', filter_cfg=dict(filter_empty_gt=True, min_size=32),
                 pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
test_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
auto_scale_lr = dict(enable=True, base_batch_size=16)
# tools/train.py adds what makes a run safe to kill and resume (atomic checkpoint writes,
# NonFiniteLossHook, RandomStateHook): internimage.engine.runner_utils.make_training_reliable.
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3, save_last=True, save_best='coco/bbox_mAP',
                    rule='greater'))
