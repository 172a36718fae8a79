# Mask2Former, InternImage-H, 896x896, COCO-Stuff -> ADE20K, 80k iterations (official mIoU
# ss/ms: 62.5 / 62.9). mmseg 1.x's Mask2FormerHead with the official head sizes: pixel
# decoder (MSDeformAttn, 6 layers) and transformer decoder (9 layers) of 1024 dims, 32
# heads, FFN 4096, 200 queries, no-object class weight 0.1. AdamW lr 1e-5, betas (0.9,
# 0.999), weight decay 0.05, layer-wise lr decay (num_layers 50, rate 0.95; the pixel
# decoder, transformer decoder and query embeddings get the top layer id), gradient
# clipping 0.1, poly schedule (power 1.0 to 0) after 1500 linear warm-up iterations (ratio
# 1e-6), 16 GPUs x 1 image, whole-image inference at the (3584, 896) scale.
# The ADE20K fine-tuning starts from the official COCO-Stuff-164k Mask2Former checkpoint
# (load_from; the official config leaves that line commented and the backbone uninitialised).
# Official settings without an mmseg 1.x equivalent: offset_lr_scale=1.0 of the official
# optimizer constructor (a no-op at 1.0); the official checkpoint interval (1000, keep 1)
# and evaluation interval (2000) are carried over.
_base_ = ['mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py', '../_base_/ade20k_crop896.py']
custom_imports = dict(imports=['mmdet.models', 'internimage', 'internimage.engine', 'internimage.datasets'],
                      allow_failed_imports=False)
load_from = 'https://huggingface.co/OpenGVLab/InternImage/resolve/main/mask2former_internimage_h_896_80k_cocostuff164k.pth'
crop_size = (896, 896)
num_classes = 150
dims = 1024
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='InternImage',
        arch='h',
        drop_path_rate=0.5,
        layer_scale=None,
        with_cp=False,
        out_indices=(0, 1, 2, 3),
        init_cfg=None),
    decode_head=dict(
        in_channels=[320, 640, 1280, 2560],
        feat_channels=dims,
        out_channels=dims,
        num_classes=num_classes,
        num_queries=200,
        pixel_decoder=dict(
            encoder=dict(layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=dims, num_heads=32),
                ffn_cfg=dict(embed_dims=dims, feedforward_channels=4 * dims))),
            positional_encoding=dict(num_feats=dims // 2)),
        positional_encoding=dict(num_feats=dims // 2),
        transformer_decoder=dict(layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=dims, num_heads=32),
            cross_attn_cfg=dict(embed_dims=dims, num_heads=32),
            ffn_cfg=dict(embed_dims=dims, feedforward_channels=4 * dims))),
        loss_cls=dict(class_weight=[1.0] * num_classes + [0.1])),
    test_cfg=dict(mode='whole'))
train_dataloader = dict(batch_size=1, dataset=dict(type='CheckedADE20KDataset',
                                                   pipeline={{_base_.crop896_train_pipeline}}))
val_dataloader = dict(dataset=dict(type='CheckedADE20KDataset', pipeline={{_base_.crop896_test_pipeline}}))
test_dataloader = val_dataloader
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-5, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    constructor='InternImageLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(num_layers=50, layer_decay_rate=0.95))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=80000),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=80000, val_interval=2000)
auto_scale_lr = dict(enable=False, base_batch_size=16)
# tools/train.py adds what makes a run safe to kill and resume (atomic checkpoint writes,
# NonFiniteLossHook, RandomStateHook): internimage.engine.runner_utils.make_training_reliable.
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000, max_keep_ckpts=1,
                                     save_best='mIoU', rule='greater'))
# Sharded training: FSDP full shard (weights, gradients and AdamW state over the GPUs, i.e.
# ZeRO-3; the official run used DDP). tools/train.py trains a config that states a strategy with
# mmengine's FlexibleRunner; tools/test.py ignores it. GiB per GPU, float32, 1 image of 896,
# no with_cp, from `python tools/memory_plan.py CONFIG --gpus N` (activations 20.9 GiB, backbone
# only: the pixel and transformer decoders come on top):
#   GPUs      DDP   ZeRO-1   full shard (this strategy)
#      8     40.5     32.0         23.4
#     16     40.5     31.3         22.2
#     32     40.5     31.0         21.6
# --strategy fsdp|deepspeed-zero1|deepspeed-zero3|ddp overrides it; without --launcher (one
# process) it is not used.
strategy = dict(type='InternImageFSDPStrategy', state_dict_cfg='full',
                model_wrapper=dict(type='MMFullyShardedDataParallel', use_orig_params=True, sync_module_states=True,
                                   auto_wrap_policy=dict(type='internimage_block_wrap_policy')))  # a unit per block
