# UperNet, InternImage-G, 896x896, 160k iterations; 16 GPUs x 1 image, gradient checkpointing.
_base_ = ['./upernet_internimage-h_896_160k_ade20k.py']
pretrained = 'internimage://internimage_g_pretrainto22k_384'  # official release, see internimage/models/variants.py
model = dict(
    backbone=dict(arch='g', with_cp=True, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[512, 1024, 2048, 4096]),
    auxiliary_head=dict(in_channels=2048))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=56, layer_decay_rate=0.95))
# Sharded training: FSDP full shard, as the H config states. GiB per GPU, float32, 1 image of
# 896 with with_cp, from `python tools/memory_plan.py CONFIG --gpus N` (activations 2.9 GiB,
# backbone only: keep a margin):
#   GPUs      DDP   ZeRO-1   full shard (this strategy)
#      8     49.3     29.0          8.7
#     16     49.3     27.5          5.8
#     32     49.3     26.8          4.3
# --strategy fsdp|deepspeed-zero1|deepspeed-zero3|ddp overrides it; without --launcher (one
# process) it is not used.
strategy = dict(type='InternImageFSDPStrategy', state_dict_cfg='full',
                model_wrapper=dict(type='MMFullyShardedDataParallel', use_orig_params=True, sync_module_states=True,
                                   auto_wrap_policy=dict(type='internimage_block_wrap_policy')))  # a unit per block
