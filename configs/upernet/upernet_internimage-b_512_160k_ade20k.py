# UperNet, InternImage-B, 512x512, 160k iterations (official mIoU ss/ms: 50.8 / 51.3).
_base_ = ['../_base_/upernet_internimage_ade20k.py']
pretrained = 'https://huggingface.co/OpenGVLab/InternImage/resolve/main/internimage_b_1k_224.pth'
model = dict(
    backbone=dict(channels=112, depths=[4, 4, 21, 4], groups=[7, 14, 28, 56], drop_path_rate=0.4, post_norm=True,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[112, 224, 448, 896]),
    auxiliary_head=dict(in_channels=448))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=33, layer_decay_rate=1.0))
