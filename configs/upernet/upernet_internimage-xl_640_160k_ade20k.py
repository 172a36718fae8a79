# UperNet, InternImage-XL (ImageNet-22k), 640x640, 160k iterations (official mIoU ss/ms: 55.0 / 55.3).
_base_ = ['./upernet_internimage-l_640_160k_ade20k.py']
pretrained = 'internimage://internimage_xl_22k_384'  # official release, see internimage/models/variants.py
model = dict(
    backbone=dict(arch='xl', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[192, 384, 768, 1536]),
    auxiliary_head=dict(in_channels=768))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=39, layer_decay_rate=0.94))
