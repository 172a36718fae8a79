# DINO-4scale, InternImage-H, Objects365 -> COCO fine-tuning, after the official
# dino_4scale_internimage_h_objects365_coco_ss.py (no published weights or metrics for it:
# the published DINO-H, 65.0 box mAP / 2.18B, uses the composite CB-InternImage-H backbone,
# which is not ported). InternImage-H backbone
# (drop path 0.5, no layer scale, checkpointing), 1000 denoising queries, 300 detections
# per image, AdamW lr 1e-4, weight decay 1e-4, layer-wise lr decay (num_layers 50, rate
# 0.94) with the deformable attention's sampling offsets at 1e-3 of their lr
# (offset_lr_scale), gradient clipping 0.1, 500 linear warm-up iterations (ratio 1e-3),
# then a constant lr for 20k iterations, 1 image per GPU; training resize of the long side
# to 2000 and the short side in 600..1800, test resize (2000, 1000).
# The fine-tuning starts from an Objects365-trained detector, which the official release
# does not publish (its config leaves the backbone uninitialised): set load_from.
# Official settings without an mmdet 3.x equivalent: the transformer FFNs' activation
# checkpointing (use_checkpoint; mmdet 3.x's encoder num_cp needs fairscale, not installed
# here), snip_cfg=dict(type='v3', weight=0.1) of the official DINO head (scale-aware
# training, not in mmdet 3.x); the official EMA hook is commented out there and not used.
_base_ = ['./dino-4scale_internimage-t_layer-wise-lr_1x_coco.py']
model = dict(
    backbone=dict(arch='h', drop_path_rate=0.5, layer_scale=None, with_cp=True, init_cfg=None),
    neck=dict(in_channels=[640, 1280, 2560]),
    dn_cfg=dict(group_cfg=dict(num_dn_queries=1000)),
    test_cfg=dict(max_per_img=300))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomResize', scale=[(2000, 600), (2000, 1800)], keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2000, 1000), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=1, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=50, layer_decay_rate=0.94, offset_lr_scale=1e-3))
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=20000, val_interval=200)
param_scheduler = [dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=500)]
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=200, max_keep_ckpts=3, save_last=True))
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(enable=False)  # the lr above whatever the number of GPUs
# Sharded training: FSDP full shard (weights, gradients and AdamW state over the GPUs, i.e.
# ZeRO-3). tools/train.py trains a config that states a strategy with mmengine's FlexibleRunner;
# tools/test.py ignores it. GiB per GPU, float32, 1 image at the largest training size
# (2000x1800) with with_cp, from `python tools/memory_plan.py CONFIG --gpus N --shape 1800 2000`
# (activations 8.4 GiB, backbone only: the DINO head and encoder come on top):
#   GPUs      DDP   ZeRO-1   full shard (this strategy)
#      8     24.8     17.6         10.5
#     16     24.8     17.1          9.5
#     32     24.8     16.9          9.0
# --strategy fsdp|deepspeed-zero1|deepspeed-zero3|ddp overrides it; without --launcher (one
# process) it is not used.
strategy = dict(type='InternImageFSDPStrategy', state_dict_cfg='full',
                model_wrapper=dict(type='MMFullyShardedDataParallel', use_orig_params=True, sync_module_states=True,
                                   auto_wrap_policy=dict(type='internimage_block_wrap_policy')))  # a unit per block
