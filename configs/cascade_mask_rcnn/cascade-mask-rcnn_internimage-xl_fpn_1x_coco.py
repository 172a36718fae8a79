# Cascade Mask R-CNN + FPN, InternImage-XL (ImageNet-22k), 1x schedule (official: 55.3 / 48.1).
_base_ = ['./cascade-mask-rcnn_internimage-l_fpn_1x_coco.py']
pretrained = 'internimage://internimage_xl_22k_384'  # official release, see internimage/models/variants.py
model = dict(
    backbone=dict(arch='xl', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[192, 384, 768, 1536]))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=39))
