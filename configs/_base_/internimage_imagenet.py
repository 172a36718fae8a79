# InternImage on ImageNet-1k with mmpretrain 1.x: what the official classification recipes
# share (classification/config.py defaults), written as the from-scratch 224 recipe.
# The configs in configs/classification set the variant, the input size (pipelines), the
# batch and the schedule. Pipeline pieces are named here for them ({{_base_.rand_augment}}).
_base_ = ['mmpretrain::_base_/default_runtime.py']
custom_imports = dict(imports=['internimage', 'internimage.engine', 'internimage.datasets'], allow_failed_imports=False)

data_root = 'data/imagenet/'  # train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, or meta/{train,val}.txt
num_classes = 1000
bgr_mean = [103.53, 116.28, 123.675]
bgr_std = [57.375, 57.12, 58.395]

model = dict(
    type='ImageClassifier',
    # timm / official normalisation (ImageNet mean and std, RGB); images are read BGR, so
    # to_rgb. (Inside the model: a top-level data_preprocessor would also be given to a
    # --tta wrapper, whose inner model would then get the 1000-class one.)
    data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=num_classes, mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], to_rgb=True),
    # The whole official classifier is the backbone (official state-dict keys under
    # `backbone.`); ClsHead has no layers and takes its logits.
    backbone=dict(type='InternImageClsBackbone', arch='t', num_classes=num_classes, drop_path_rate=0.1,
                  layer_scale=None, with_cp=False),
    # Label smoothing on top of the Mixup/CutMix soft targets: timm's Mixup(label_smoothing=0.1)
    # with SoftTargetCrossEntropy, as the official code, gives the same targets.
    head=dict(type='ClsHead', loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original',
                                        num_classes=num_classes), topk=(1, 5)),
    # timm Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch'):
    # every batch is mixed, by Mixup or CutMix with equal chance.
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)], probs=[0.5, 0.5]))

# Pieces of the training pipeline (the official: timm's create_transform with bicubic,
# RandAugment 'rand-m9-mstd0.5-inc1', random erasing 0.25 'pixel' mode; colour jitter 0.4
# is configured but timm does not apply it together with RandAugment).
load_image = dict(type='CheckedLoadImageFromFile')  # names an empty or broken image file
flip = dict(type='RandomFlip', prob=0.5, direction='horizontal')
# mmpretrain's 'timm_increasing' policies are timm's _RAND_INCREASING_TRANSFORMS; two ops per
# image, each applied with probability 0.5, magnitude N(9, 0.5) clipped to [0, 10], mean-colour fill.
rand_augment = dict(
    type='RandAugment', policies='timm_increasing', num_policies=2, total_level=10, magnitude_level=9,
    magnitude_std=0.5, hparams=dict(pad_val=[round(x) for x in bgr_mean], interpolation='bicubic'))
# timm 'pixel' mode: per-pixel N(0, 1) after normalisation = N(mean, std) before it.
random_erasing = dict(
    type='RandomErasing', erase_prob=0.25, mode='rand', min_area_ratio=0.02, max_area_ratio=1 / 3,
    fill_color=bgr_mean, fill_std=bgr_std)
pack = dict(type='PackInputs')

train_pipeline = [
    load_image,
    dict(type='RandomResizedCrop', scale=224, backend='pillow', interpolation='bicubic'),
    flip, rand_augment, random_erasing, pack,
]
# Official test transform at 224: short side to 224 / 0.875 = 256, centre crop 224.
test_pipeline = [
    load_image,
    dict(type='ResizeEdge', scale=256, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    pack,
]
# tools/test.py --tta: the average of the scores of the image and its horizontal flip.
tta_model = dict(type='AverageClsScoreTTA')
tta_flips = dict(type='TestTimeAug', transforms=[[dict(type='RandomFlip', prob=0.0),
                                                  dict(type='RandomFlip', prob=1.0)], [pack]])
tta_pipeline = test_pipeline[:-1] + [tta_flips]

# CheckedImageNet: mmpretrain's ImageNet that names missing folders/files, class folders
# without images and class counts that do not match (internimage/datasets/imagenet.py).
train_dataloader = dict(
    batch_size=128, num_workers=8, persistent_workers=True, pin_memory=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type='CheckedImageNet', data_root=data_root, split='train', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=64, num_workers=8, persistent_workers=True, pin_memory=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CheckedImageNet', data_root=data_root, split='val', pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, 5))
test_evaluator = val_evaluator

# AdamW (eps 1e-8, betas 0.9/0.999), weight decay 0.05 except for one-dimensional parameters
# (norms, biases, layer scale), gradient norm clipped at 5.0. The lr is the official
# BASE_LR * total_batch / 512 at the config's total batch (auto_scale_lr's base_batch_size),
# so other GPU counts rescale it (and the warm-up and minimum lr, which are ratios).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=5e-4 * 4096 / 512, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0),
    clip_grad=dict(max_norm=5.0))
auto_scale_lr = dict(enable=True, base_batch_size=4096)

# 300 epochs: linear warm-up over 20 epochs from 5e-7 (ratio 1e-3 of BASE_LR 5e-4), then
# cosine to 5e-6 (ratio 1e-2), both updated every iteration as the official timm scheduler.
train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)
val_cfg = dict()
test_cfg = dict()
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min_ratio=1e-2, by_epoch=True, begin=20, end=300,
         convert_to_iter_based=True),
]

# EMA of the weights with decay 0.9999 per iteration (mmengine's momentum is 1 - decay),
# buffers included like timm's ModelEma; validation and checkpoints use the EMA weights
# (set evaluate_on_origin=True to also evaluate the raw weights, as the official code does).
# ClassCountCheckHook: the model's class count must equal the dataset's.
custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, update_buffers=True, evaluate_on_ema=True, evaluate_on_origin=False,
         priority='ABOVE_NORMAL'),
    dict(type='ClassCountCheckHook'),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=100),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3, save_best='accuracy/top1', rule='greater'))
randomness = dict(seed=0, diff_rank_seed=True)  # per-rank augmentation streams
