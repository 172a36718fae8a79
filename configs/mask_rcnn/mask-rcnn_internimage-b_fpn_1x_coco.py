# Mask R-CNN + FPN, InternImage-B, 1x schedule (official: 48.8 / 44.0 box / mask mAP).
_base_ = ['./mask-rcnn_internimage-t_fpn_1x_coco.py']
pretrained = 'internimage://internimage_b_1k_224'  # official release, see internimage/models/variants.py
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.4, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[112, 224, 448, 896]))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=33, layer_decay_rate=1.0))
