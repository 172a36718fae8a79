# DINO-4scale, InternImage-G, Objects365 -> COCO fine-tuning: as the InternImage-H config
# (see it for the recipe and for what has no mmdet 3.x equivalent), with the G backbone
# (drop path 0.5, no layer scale, checkpointing) and layer-wise lr decay (num_layers 56,
# rate 0.94). The official G config's transformer FFN is EfficientFFN with checkpointing:
# mmdet 3.x's FFN is used (same parameters, no checkpointing).
_base_ = ['./dino-4scale_internimage-h_objects365-pre_coco.py']
model = dict(
    backbone=dict(arch='g', drop_path_rate=0.5, layer_scale=None, with_cp=True, init_cfg=None),
    neck=dict(in_channels=[1024, 2048, 4096]))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=56, layer_decay_rate=0.94, offset_lr_scale=1e-3))
# Sharded training: FSDP full shard, as the H config states. GiB per GPU, float32, 1 image at
# 2000x1800 with with_cp, from `python tools/memory_plan.py CONFIG --gpus N --shape 1800 2000`
# (activations 12.9 GiB, backbone only: the DINO head and encoder come on top):
#   GPUs      DDP   ZeRO-1   full shard (this strategy)
#      8     58.8     38.7         18.6
#     16     58.8     37.3         15.7
#     32     58.8     36.5         14.3
# --strategy fsdp|deepspeed-zero1|deepspeed-zero3|ddp overrides it; without --launcher (one
# process) it is not used.
strategy = dict(type='InternImageFSDPStrategy', state_dict_cfg='full',
                model_wrapper=dict(type='MMFullyShardedDataParallel', use_orig_params=True, sync_module_states=True,
                                   auto_wrap_policy=dict(type='internimage_block_wrap_policy')))  # a unit per block
