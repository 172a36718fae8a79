# Mask R-CNN + FPN, InternImage-B, 1x schedule (official: 48.8 / 44.0 box / mask mAP).
_base_ = ['./mask-rcnn_internimage-t_fpn_1x_coco.py']
pretrained = 'https://huggingface.co/OpenGVLab/InternImage/resolve/main/internimage_b_1k_224.pth'
model = dict(
    backbone=dict(
        channels=112,
        depths=[4, 4, 21, 4],
        groups=[7, 14, 28, 56],
        drop_path_rate=0.4,
        post_norm=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[112, 224, 448, 896]))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=33, layer_decay_rate=1.0))
