# InternImage-H fine-tuned on ImageNet-1k at 640 for 20 epochs from its ImageNet-22K
# checkpoint internimage_h_jointto22k_384.pth (official internimage_h_22kto1k_640.yaml: 89.6 top-1).
# Recipe: configs/_base_/internimage_imagenet_finetune.py (layer decay 0.9, DCN_LR_MUL 0.1,
# label smoothing 0.3, no Mixup/CutMix/erasing, EMA, activation checkpointing). Total batch
# 512 = 32 GPUs x 16 images; auto_scale_lr rescales the lr (2e-5) for other totals.
_base_ = ['../_base_/internimage_imagenet_finetune.py']
img_size = 640
# The 22K checkpoint's 21,841-class head is cut to the 1,000 ImageNet-1k classes when loaded
# (rows chosen with the official map22kto1k.txt; internimage.load_classifier_weights).
model = dict(
    backbone=dict(arch='h', drop_path_rate=0.2, layer_scale=None, with_cp=True,
                  init_cfg=dict(type='Pretrained', checkpoint='internimage://internimage_h_jointto22k_384')))
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
# Sharded training: FSDP full shard (weights, gradients and AdamW state over the GPUs, i.e.
# ZeRO-3), EMA kept per shard (ShardedEMAHook). The official run used DeepSpeed ZeRO-1; FSDP is
# used here because EMA, exact resume and atomic checkpoints are tested with it
# (tests/test_sharded_training.py; DeepSpeed runs give checkpoint hooks no weights, so no EMA).
# tools/train.py trains a config that states a strategy with mmengine's FlexibleRunner;
# tools/test.py ignores it. GiB per GPU, float32, 16 images of 640 with with_cp, from
# `python tools/memory_plan.py CONFIG --gpus N` (activations 15.4 GiB, backbone only: keep a margin):
#   GPUs      DDP   ZeRO-1   full shard (this strategy)
#      8     31.6     24.5         17.4
#     16     31.6     24.0         16.4
#     32     31.6     23.7         15.9
# --strategy fsdp|deepspeed-zero1|deepspeed-zero3|ddp overrides it; without --launcher (one
# process) it is not used.
strategy = dict(type='InternImageFSDPStrategy', state_dict_cfg='full',
                model_wrapper=dict(type='MMFullyShardedDataParallel', use_orig_params=True, sync_module_states=True,
                                   auto_wrap_policy=dict(type='internimage_block_wrap_policy')))  # a unit per block
