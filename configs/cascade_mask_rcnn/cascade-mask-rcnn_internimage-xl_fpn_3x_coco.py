# Cascade Mask R-CNN + FPN, InternImage-XL, 3x multi-scale/crop schedule (official: 56.2 / 48.8).
_base_ = ['./cascade-mask-rcnn_internimage-l_fpn_3x_coco.py']
pretrained = 'internimage://internimage_xl_22k_384'  # official release, see internimage/models/variants.py
model = dict(
    backbone=dict(arch='xl', drop_path_rate=0.6, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[192, 384, 768, 1536]))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=39))
