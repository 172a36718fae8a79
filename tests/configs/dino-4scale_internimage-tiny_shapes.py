# A tiny DINO-4scale on the InternImage-T DINO config's code path, for CPU tests: a 5-block
# InternImage, a 256-dim transformer of one encoder and one decoder layer, 30 queries,
# 64x64 synthetic shapes (see _shapes_coco.py), 2 training iterations.
_base_ = ['../../configs/dino/dino-4scale_internimage-t_layer-wise-lr_1x_coco.py', './_shapes_coco.py']
dims = 256  # DINO's decoder encodes reference points with 128 features per coordinate: 256 dims
model = dict(
    num_queries=30,
    backbone=dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], mlp_ratio=2.0, drop_path_rate=0.0,
                  with_cp=False, init_cfg=None),
    neck=dict(in_channels=[32, 64, 128], out_channels=dims),
    encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=dict(embed_dims=dims, num_heads=4, num_points=2),
                                              ffn_cfg=dict(embed_dims=dims, feedforward_channels=64))),
    decoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=dict(embed_dims=dims, num_heads=4),
                                              cross_attn_cfg=dict(embed_dims=dims, num_heads=4, num_points=2),
                                              ffn_cfg=dict(embed_dims=dims, feedforward_channels=64))),
    positional_encoding=dict(num_feats=dims // 2),
    bbox_head=dict(num_classes=3, embed_dims=dims),
    dn_cfg=dict(group_cfg=dict(num_dn_queries=10)),
    test_cfg=dict(max_per_img=20))
train_dataloader = {{_base_.shapes_dataloaders.train}}
val_dataloader = {{_base_.shapes_dataloaders.val}}
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={{_base_.shapes_dataloaders.evaluator.ann_file}}, metric='bbox')
test_evaluator = val_evaluator
train_cfg = {{_base_.shapes_schedule.train_cfg}}
param_scheduler = {{_base_.shapes_schedule.param_scheduler}}
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(save_best=None))
optim_wrapper = dict(optimizer=dict(lr=1e-3), paramwise_cfg=dict(num_layers=5, layer_decay_rate=0.9))
auto_scale_lr = dict(enable=False)
randomness = dict(seed=0)
