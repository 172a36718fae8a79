# UperNet, InternImage-B, 512x512, 160k iterations (official mIoU ss/ms: 50.8 / 51.3).
_base_ = ['../_base_/upernet_internimage_ade20k.py']
pretrained = 'internimage://internimage_b_1k_224'  # official release, see internimage/models/variants.py
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.4, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[112, 224, 448, 896]),
    auxiliary_head=dict(in_channels=448))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=33, layer_decay_rate=1.0))
