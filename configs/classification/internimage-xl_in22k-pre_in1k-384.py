# InternImage-XL fine-tuned on ImageNet-1k at 384 for 20 epochs from its ImageNet-22K
# checkpoint internimage_xl_22k_192to384.pth (official internimage_xl_22kto1k_384.yaml: 88.0 top-1).
# Recipe: configs/_base_/internimage_imagenet_finetune.py (layer decay 0.9, DCN_LR_MUL 0.1,
# label smoothing 0.3, no Mixup/CutMix/erasing, EMA, activation checkpointing). Total batch
# 512 = 32 GPUs x 16 images; auto_scale_lr rescales the lr (2e-5) for other totals.
_base_ = ['../_base_/internimage_imagenet_finetune.py']
img_size = 384
# The 22K checkpoint's 21,841-class head is cut to the 1,000 ImageNet-1k classes when loaded
# (rows chosen with the official map22kto1k.txt; internimage.load_classifier_weights).
model = dict(
    backbone=dict(arch='xl', drop_path_rate=0.2, layer_scale=1e-5, with_cp=True,
                  init_cfg=dict(type='Pretrained', checkpoint='internimage://internimage_xl_22k_384')))
train_pipeline = [
    {{_base_.load_image}},
    dict(type='RandomResizedCrop', scale=img_size, backend='pillow', interpolation='bicubic'),
    {{_base_.flip}},
    {{_base_.rand_augment}},
    {{_base_.pack}},
]
# Above 224 the official test transform resizes straight to the input size (no crop).
test_pipeline = [
    {{_base_.load_image}},
    dict(type='Resize', scale=(img_size, img_size), backend='pillow', interpolation='bicubic'),
    {{_base_.pack}},
]
tta_pipeline = test_pipeline[:-1] + [{{_base_.tta_flips}}]
train_dataloader = dict(batch_size=16, dataset=dict(pipeline=train_pipeline))  # per GPU, 32 GPUs
val_dataloader = dict(batch_size=16, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
auto_scale_lr = dict(base_batch_size=512)
