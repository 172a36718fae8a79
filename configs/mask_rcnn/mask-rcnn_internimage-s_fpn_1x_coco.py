# Mask R-CNN + FPN, InternImage-S, 1x schedule (official: 47.8 / 43.3 box / mask mAP).
_base_ = ['./mask-rcnn_internimage-t_fpn_1x_coco.py']
pretrained = 'internimage://internimage_s_1k_224'  # official release, see internimage/models/variants.py
model = dict(
    backbone=dict(arch='s', drop_path_rate=0.3, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[80, 160, 320, 640]))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=33, layer_decay_rate=1.0))
