# UperNet, InternImage-H (joint 427M -> 22k), 896x896, 160k iterations (official mIoU ss/ms: 59.9 / 60.3).
# 16 GPUs x 1 image.
_base_ = ['../_base_/upernet_internimage_ade20k.py', '../_base_/ade20k_crop896.py']
pretrained = 'internimage://internimage_h_jointto22k_384'  # official release, see internimage/models/variants.py
crop_size = (896, 896)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='h', drop_path_rate=0.5, layer_scale=None,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[320, 640, 1280, 2560]),
    auxiliary_head=dict(in_channels=1280),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(597, 597)))
train_dataloader = dict(batch_size=1, dataset=dict(pipeline={{_base_.crop896_train_pipeline}}))
val_dataloader = dict(dataset=dict(pipeline={{_base_.crop896_test_pipeline}}))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=2e-5), paramwise_cfg=dict(num_layers=50, layer_decay_rate=0.95))
# Sharded training: FSDP full shard (weights, gradients and AdamW state over the GPUs, i.e.
# ZeRO-3; the official run used DDP). tools/train.py trains a config that states a strategy with
# mmengine's FlexibleRunner; tools/test.py ignores it. GiB per GPU, float32, 1 image of 896,
# no with_cp, from `python tools/memory_plan.py CONFIG --gpus N` (activations 20.9 GiB, backbone
# only: keep a margin; with_cp=True brings them to 1.9):
#   GPUs      DDP   ZeRO-1   full shard (this strategy)
#      8     37.6     30.3         23.0
#     16     37.6     29.8         22.0
#     32     37.6     29.6         21.5
# --strategy fsdp|deepspeed-zero1|deepspeed-zero3|ddp overrides it; without --launcher (one
# process) it is not used.
strategy = dict(type='InternImageFSDPStrategy', state_dict_cfg='full',
                model_wrapper=dict(type='MMFullyShardedDataParallel', use_orig_params=True, sync_module_states=True,
                                   auto_wrap_policy=dict(type='internimage_block_wrap_policy')))  # a unit per block
