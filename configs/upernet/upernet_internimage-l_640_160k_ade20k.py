# UperNet, InternImage-L (ImageNet-22k), 640x640, 160k iterations (official mIoU ss/ms: 53.9 / 54.1).
_base_ = ['../_base_/upernet_internimage_ade20k.py', '../_base_/ade20k_crop640.py']
pretrained = 'https://huggingface.co/OpenGVLab/InternImage/resolve/main/internimage_l_22k_192to384.pth'
crop_size = (640, 640)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(channels=160, depths=[5, 5, 22, 5], groups=[10, 20, 40, 80], drop_path_rate=0.4,
                  offset_scale=2.0, post_norm=True, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[160, 320, 640, 1280]),
    auxiliary_head=dict(in_channels=640),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(426, 426)))
train_dataloader = dict(dataset=dict(pipeline={{_base_.crop640_train_pipeline}}))
val_dataloader = dict(dataset=dict(pipeline={{_base_.crop640_test_pipeline}}))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=2e-5), paramwise_cfg=dict(num_layers=37, layer_decay_rate=0.94))
