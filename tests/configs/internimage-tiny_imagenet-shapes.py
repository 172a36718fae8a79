# A tiny InternImage classifier on the InternImage-T ImageNet config's code path, for CPU
# tests: a 5-block model, 3 classes, 32x32 crops of synthetic shapes in the ImageNet folder
# layout under $INTERNIMAGE_SHAPES_IMAGENET (train/<class>/*.png, val/<class>/*.png; made by
# tests/test_classification.py). Mixup/CutMix, RandAugment, erasing, EMA and the checks as
# in the real config; 1 epoch, lr 1e-3 with a 2-iteration warm-up.
_base_ = ['../../configs/classification/internimage-t_in1k-224.py']
shapes_root = '{{$INTERNIMAGE_SHAPES_IMAGENET:data/shapes_imagenet/}}'
shapes_classes = ('circle', 'square', 'triangle')
model = dict(
    data_preprocessor=dict(num_classes=3),
    backbone=dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_classes=3, drop_path_rate=0.0),
    head=dict(loss=dict(num_classes=3)))
shapes_train_pipeline = [
    {{_base_.load_image}},
    dict(type='RandomResizedCrop', scale=32, backend='pillow', interpolation='bicubic'),
    {{_base_.flip}},
    {{_base_.rand_augment}},
    {{_base_.random_erasing}},
    {{_base_.pack}},
]
shapes_test_pipeline = [
    {{_base_.load_image}},
    dict(type='ResizeEdge', scale=36, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=32),
    {{_base_.pack}},
]
tta_pipeline = shapes_test_pipeline[:-1] + [{{_base_.tta_flips}}]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False, pin_memory=False,
    dataset=dict(data_root=shapes_root, metainfo=dict(classes=shapes_classes), pipeline=shapes_train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False, pin_memory=False,
    dataset=dict(data_root=shapes_root, metainfo=dict(classes=shapes_classes), pipeline=shapes_test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, 2))  # top-5 needs 5 classes
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(lr=1e-3))
auto_scale_lr = dict(enable=False)
train_cfg = dict(max_epochs=1, val_interval=1)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1))
randomness = dict(seed=0)
# EMA momentum 0.5 instead of 1e-4: over a few iterations the EMA weights then move.
custom_hooks = [dict(type='EMAHook', momentum=0.5, update_buffers=True, priority='ABOVE_NORMAL'),
                dict(type='ClassCountCheckHook')]
