# DINO-4scale, InternImage-L, the backbone at 0.1x the lr (paramwise_cfg custom_keys, the
# default mmengine constructor), 1x schedule. AdamW lr 1e-4, weight decay 0.05, gradient
# clipping 0.1, otherwise as dino-4scale_internimage-l_layer-wise-lr_1x_coco.py.
_base_ = ['./dino-4scale_internimage-l_layer-wise-lr_1x_coco.py']
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1)}))
