# The quickstart (`make demo`): Mask R-CNN with a small InternImage backbone trained from
# scratch on CPU on synthetic shapes (internimage.datasets.synthetic, 128x128 images of circles,
# squares and triangles generated into data/shapes_coco by tools/quickstart.py).
# Same code path as the COCO configs (InternImage + DCNv3 kernels, FPN, Mask R-CNN heads,
# layer-decay AdamW); sizes chosen to train in minutes on 2 cores:
#   backbone: channels 32, depths [1, 1, 3, 1], groups [2, 4, 8, 16] (16 channels per group)
#   FPN 64 channels; anchors of 16-256 px for objects of 10-60 px.
# The backbone starts from scratch: its init_cfg names no checkpoint (checkpoint=None loads
# nothing). To start it from a checkpoint's backbone (e.g. a published quickstart model):
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = ['../mask_rcnn/mask-rcnn_internimage-t_fpn_1x_coco.py']
data_root = '{{$INTERNIMAGE_SHAPES_COCO:data/shapes_coco/}}'
metainfo = dict(classes=('circle', 'square', 'triangle'), palette=[(220, 20, 60), (0, 130, 200), (60, 180, 75)])
image_size = 128
model = dict(
    backbone=dict(channels=32, depths=[1, 1, 3, 1], groups=[2, 4, 8, 16], mlp_ratio=4.0, drop_path_rate=0.0,
                  layer_scale=None, init_cfg=dict(type='Pretrained', checkpoint=None)),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64,
                  anchor_generator=dict(scales=[4], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=3),
        mask_roi_extractor=dict(out_channels=64),
        mask_head=dict(in_channels=64, conv_out_channels=64, num_classes=3)),
    train_cfg=dict(rpn=dict(sampler=dict(num=128)), rpn_proposal=dict(nms_pre=1000, max_per_img=300),
                   rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=200), rcnn=dict(max_per_img=20)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json', metric=['bbox', 'segm'])
test_evaluator = val_evaluator
max_epochs = 16
train_cfg = dict(max_epochs=max_epochs, val_interval=4)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min_ratio=0.01,
         convert_to_iter_based=True),
]
optim_wrapper = dict(optimizer=dict(lr=2e-3, weight_decay=0.05), paramwise_cfg=dict(num_layers=6, layer_decay_rate=1.0))
auto_scale_lr = dict(enable=False)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=4, max_keep_ckpts=1))
randomness = dict(seed=0)
