# UperNet, InternImage-S, 512x512, 160k iterations (official mIoU ss/ms: 50.1 / 50.9).
_base_ = ['../_base_/upernet_internimage_ade20k.py']
pretrained = 'internimage://internimage_s_1k_224'  # official release, see internimage/models/variants.py
model = dict(
    backbone=dict(arch='s', drop_path_rate=0.3, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[80, 160, 320, 640]),
    auxiliary_head=dict(in_channels=320))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=33, layer_decay_rate=1.0))
