# A tiny Mask2Former on the InternImage-H ADE20K config's code path, for CPU tests: a 5-block
# InternImage, a 32-dim pixel decoder and transformer decoder of one layer each, 10 queries,
# 64x64 synthetic shapes in the ADE20K layout under $INTERNIMAGE_SHAPES_ADE (see
# upernet_internimage-tiny_shapes.py), 2 training iterations.
_base_ = ['../../configs/mask2former/mask2former_internimage-h_896_80k_cocostuff2ade20k_ss.py']
load_from = None
data_root = '{{$INTERNIMAGE_SHAPES_ADE:data/shapes_ade/}}'
crop_size = (64, 64)
dims = 32
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(_delete_=True, type='InternImage', arch='t', channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8],
                  mlp_ratio=2.0, drop_path_rate=0.0, layer_scale=1.0, out_indices=(0, 1, 2, 3), init_cfg=None),
    decode_head=dict(
        in_channels=[16, 32, 64, 128],
        feat_channels=dims,
        out_channels=dims,
        num_queries=10,
        pixel_decoder=dict(
            norm_cfg=dict(type='GN', num_groups=8),
            encoder=dict(num_layers=1, layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=dims, num_heads=4),
                ffn_cfg=dict(embed_dims=dims, feedforward_channels=64))),
            positional_encoding=dict(num_feats=dims // 2)),
        positional_encoding=dict(num_feats=dims // 2),
        transformer_decoder=dict(num_layers=1, layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=dims, num_heads=4),
            cross_attn_cfg=dict(embed_dims=dims, num_heads=4),
            ffn_cfg=dict(embed_dims=dims, feedforward_channels=64))),
        train_cfg=dict(num_points=256)))
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
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=2)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)]
optim_wrapper = dict(optimizer=dict(lr=1e-3), paramwise_cfg=dict(num_layers=5, layer_decay_rate=0.9))
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2, save_best=None))
