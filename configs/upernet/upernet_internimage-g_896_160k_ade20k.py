# UperNet, InternImage-G, 896x896, 160k iterations; 16 GPUs x 1 image, gradient checkpointing.
_base_ = ['./upernet_internimage-h_896_160k_ade20k.py']
pretrained = 'internimage://internimage_g_pretrainto22k_384'  # official release, see internimage/models/variants.py
model = dict(
    backbone=dict(arch='g', with_cp=True, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[512, 1024, 2048, 4096]),
    auxiliary_head=dict(in_channels=2048))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=56, layer_decay_rate=0.95))
