# A tiny UperNet on the InternImage-T ADE20K config's code path, for CPU tests: a 5-block
# InternImage, narrow heads, 64x64 synthetic shapes in the ADE20K layout
# (internimage.datasets.synthetic.make_ade_shapes) under $INTERNIMAGE_SHAPES_ADE; the shapes use the
# first ADE20K class ids, so the heads keep ADE20K's 150 classes.
_base_ = ['../../configs/upernet/upernet_internimage-t_512_160k_ade20k.py']
data_root = '{{$INTERNIMAGE_SHAPES_ADE:data/shapes_ade/}}'
crop_size = (64, 64)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], mlp_ratio=2.0, drop_path_rate=0.0,
                  init_cfg=None),
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=32, num_classes=150),
    auxiliary_head=dict(in_channels=64, channels=16, num_classes=150))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='CheckSegLabels', num_classes=150, ignore_index=255),
    dict(type='RandomResize', scale=(256, 64), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 64), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='CheckSegLabels', num_classes=150, ignore_index=255),
    dict(type='PackSegInputs'),
]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug',
         transforms=[[dict(type='Resize', scale=(int(256 * r), int(64 * r)), keep_ratio=True) for r in (0.75, 1.0)],
                     [dict(type='RandomFlip', prob=0.0, direction='horizontal'),
                      dict(type='RandomFlip', prob=1.0, direction='horizontal')],
                     [dict(type='LoadAnnotations', reduce_zero_label=True)],
                     [dict(type='PackSegInputs')]]),
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=8, val_interval=4)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=2),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=2, end=8),
]
optim_wrapper = dict(optimizer=dict(lr=1e-3), paramwise_cfg=dict(num_layers=5, layer_decay_rate=0.9))
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=4))
