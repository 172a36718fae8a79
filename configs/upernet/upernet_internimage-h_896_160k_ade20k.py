# UperNet, InternImage-H (joint 427M -> 22k), 896x896, 160k iterations (official mIoU ss/ms: 59.9 / 60.3).
# 16 GPUs x 1 image.
_base_ = ['../_base_/upernet_internimage_ade20k.py', '../_base_/ade20k_crop896.py']
pretrained = 'https://huggingface.co/OpenGVLab/InternImage/resolve/main/internimage_h_jointto22k_384.pth'
crop_size = (896, 896)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(channels=320, depths=[6, 6, 32, 6], groups=[10, 20, 40, 80], drop_path_rate=0.5,
                  layer_scale=None, offset_scale=1.0, post_norm=False, dw_kernel_size=5, res_post_norm=True,
                  level2_post_norm=True, level2_post_norm_block_ids=[5, 11, 17, 23, 29],
                  center_feature_scale=True, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[320, 640, 1280, 2560]),
    auxiliary_head=dict(in_channels=1280),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(597, 597)))
train_dataloader = dict(batch_size=1, dataset=dict(pipeline={{_base_.crop896_train_pipeline}}))
val_dataloader = dict(dataset=dict(pipeline={{_base_.crop896_test_pipeline}}))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=2e-5), paramwise_cfg=dict(num_layers=50, layer_decay_rate=0.95))
