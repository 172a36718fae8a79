# InternImage-G fine-tuned on ImageNet-1k at 512 for 20 epochs from its ImageNet-22K
# checkpoint internimage_g_pretrainto22k_384.pth (official internimage_g_22kto1k_512.yaml: 90.1 top-1).
# Recipe: configs/_base_/internimage_imagenet_finetune.py (layer decay 0.9, DCN_LR_MUL 0.1,
# label smoothing 0.3, no Mixup/CutMix/erasing, EMA, activation checkpointing). Total batch
# 512 = 64 GPUs x 8 images; auto_scale_lr rescales the lr (2e-5) for other totals.
_base_ = ['../_base_/internimage_imagenet_finetune.py']
img_size = 512
# The 22K checkpoint's 21,841-class head is cut to the 1,000 ImageNet-1k classes when loaded
# (rows chosen with the official map22kto1k.txt; internimage.load_classifier_weights).
model = dict(
    backbone=dict(arch='g', drop_path_rate=0.4, layer_scale=None, with_cp=True,
                  init_cfg=dict(type='Pretrained', checkpoint='internimage://internimage_g_pretrainto22k_384')))
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
train_dataloader = dict(batch_size=8, dataset=dict(pipeline=train_pipeline))  # per GPU, 64 GPUs
val_dataloader = dict(batch_size=8, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
auto_scale_lr = dict(base_batch_size=512)
# Sharded training: FSDP full shard (weights, gradients and AdamW state over the GPUs, i.e.
# ZeRO-3), EMA kept per shard (ShardedEMAHook). The official run used DeepSpeed ZeRO-1; FSDP is
# used here because EMA, exact resume and atomic checkpoints are tested with it
# (tests/test_sharded_training.py; DeepSpeed runs give checkpoint hooks no weights, so no EMA).
# tools/train.py trains a config that states a strategy with mmengine's FlexibleRunner;
# tools/test.py ignores it. GiB per GPU, float32, 8 images of 512 with with_cp, from
# `python tools/memory_plan.py CONFIG --gpus N` (activations 7.5 GiB, backbone only: keep a margin):
#   GPUs      DDP   ZeRO-1   full shard (this strategy)
#      8     53.3     33.3         13.2
#     16     53.3     31.8         10.4
#     32     53.3     31.1          8.9
# --strategy fsdp|deepspeed-zero1|deepspeed-zero3|ddp overrides it; without --launcher (one
# process) it is not used.
strategy = dict(type='InternImageFSDPStrategy', state_dict_cfg='full',
                model_wrapper=dict(type='MMFullyShardedDataParallel', use_orig_params=True, sync_module_states=True,
                                   auto_wrap_policy=dict(type='internimage_block_wrap_policy')))  # a unit per block
