# UperNet, InternImage-L (ImageNet-22k), 640x640, 160k iterations (official mIoU ss/ms: 53.9 / 54.1).
_base_ = ['../_base_/upernet_internimage_ade20k.py', '../_base_/ade20k_crop640.py']
pretrained = 'internimage://internimage_l_22k_384'  # official release, see internimage/models/variants.py
crop_size = (640, 640)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='l', drop_path_rate=0.4, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[160, 320, 640, 1280]),
    auxiliary_head=dict(in_channels=640),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(426, 426)))
train_dataloader = dict(dataset=dict(pipeline={{_base_.crop640_train_pipeline}}))
val_dataloader = dict(dataset=dict(pipeline={{_base_.crop640_test_pipeline}}))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=2e-5), paramwise_cfg=dict(num_layers=37, layer_decay_rate=0.94))
