# Fine-tuning InternImage-L/XL/H/G from their ImageNet-22K (or joint) checkpoints on
# ImageNet-1k: what the official *_22kto1k yaml files share on top of the defaults
# (internimage_imagenet.py). The configs set the variant, the checkpoint and the input size.
_base_ = ['./internimage_imagenet.py']
model = dict(
    backbone=dict(with_cp=True),  # official USE_CHECKPOINT: true
    # MIXUP 0, CUTMIX 0: no batch augmentation; label smoothing 0.3
    head=dict(loss=dict(label_smooth_val=0.3)),
    train_cfg=None)
# The configs' training pipelines: REPROB 0, no random erasing (RandAugment stays on).

# Layer-wise lr decay 0.9 (the official classification rule) and DCN_LR_MUL 0.1; BASE_LR
# 2e-5 at a total batch of 512 (the official BASE_LR * total_batch / 512 with 512).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
    constructor='InternImageLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rule='classification', layer_decay_rate=0.9, dcn_lr_mul=0.1),
    clip_grad=dict(max_norm=5.0))
auto_scale_lr = dict(enable=True, base_batch_size=512)
train_dataloader = dict(batch_size=16)
val_dataloader = dict(batch_size=16)
test_dataloader = val_dataloader

# 20 epochs: warm-up over 2 epochs from WARMUP_LR 0 (mmengine's LinearLR needs a factor
# above 0: 1e-6 of the lr), cosine to MIN_LR 0.
train_cfg = dict(max_epochs=20)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=True, begin=0, end=2, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=0.0, by_epoch=True, begin=2, end=20, convert_to_iter_based=True),
]
