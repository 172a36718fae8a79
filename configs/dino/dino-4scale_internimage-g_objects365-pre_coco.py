# DINO-4scale, InternImage-G, Objects365 -> COCO fine-tuning: as the InternImage-H config
# (see it for the recipe and for what has no mmdet 3.x equivalent), with the G backbone
# (drop path 0.5, no layer scale, checkpointing) and layer-wise lr decay (num_layers 56,
# rate 0.94). The official G config's transformer FFN is EfficientFFN with checkpointing:
# mmdet 3.x's FFN is used (same parameters, no checkpointing).
_base_ = ['./dino-4scale_internimage-h_objects365-pre_coco.py']
model = dict(
    backbone=dict(arch='g', drop_path_rate=0.5, layer_scale=None, with_cp=True, init_cfg=None),
    neck=dict(in_channels=[1024, 2048, 4096]))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=56, layer_decay_rate=0.94, offset_lr_scale=1e-3))
