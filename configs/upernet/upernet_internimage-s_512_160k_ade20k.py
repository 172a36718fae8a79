# UperNet, InternImage-S, 512x512, 160k iterations (official mIoU ss/ms: 50.1 / 50.9).
_base_ = ['../_base_/upernet_internimage_ade20k.py']
pretrained = 'https://huggingface.co/OpenGVLab/InternImage/resolve/main/internimage_s_1k_224.pth'
model = dict(
    backbone=dict(channels=80, depths=[4, 4, 21, 4], groups=[5, 10, 20, 40], drop_path_rate=0.3, post_norm=True,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[80, 160, 320, 640]),
    auxiliary_head=dict(in_channels=320))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=33, layer_decay_rate=1.0))
