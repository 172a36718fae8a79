# DINO-4scale, InternImage-L (22k 192 -> 384 release), layer-wise lr decay, 1x schedule.
# As the InternImage-T config, with the L backbone (drop path 0.4, offset scale 2.0, post
# norm, no checkpointing) and layer-wise lr decay (num_layers 37, rate 0.9); weight decay
# 1e-4. See dino-4scale_internimage-t_layer-wise-lr_1x_coco.py for what was not carried over.
_base_ = ['./dino-4scale_internimage-t_layer-wise-lr_1x_coco.py']
pretrained = 'internimage://internimage_l_22k_384'  # official release, see internimage/models/variants.py
model = dict(
    backbone=dict(arch='l', drop_path_rate=0.4, layer_scale=1.0, with_cp=False,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[320, 640, 1280]),
    test_cfg=dict(max_per_img=300))  # the official L configs keep 300 detections per image
optim_wrapper = dict(paramwise_cfg=dict(num_layers=37, layer_decay_rate=0.9))
