# A tiny Mask R-CNN on the InternImage-T config's code path, for CPU tests: a 5-block
# InternImage, narrow heads, 64x64 synthetic shapes (see _shapes_coco.py).
_base_ = ['../../configs/mask_rcnn/mask-rcnn_internimage-t_fpn_1x_coco.py', './_shapes_coco.py']
model = dict(
    backbone=dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], mlp_ratio=2.0, drop_path_rate=0.0,
                  init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=3),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32, num_classes=3)),
    train_cfg=dict(rpn=dict(sampler=dict(num=64)), rcnn=dict(sampler=dict(num=64))),
    # score_thr 0: a barely trained model still returns detections, so COCO metrics exist.
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100), rcnn=dict(score_thr=0.0, max_per_img=20)))
train_dataloader = {{_base_.shapes_dataloaders.train}}
val_dataloader = {{_base_.shapes_dataloaders.val}}
test_dataloader = val_dataloader
val_evaluator = {{_base_.shapes_dataloaders.evaluator}}
test_evaluator = val_evaluator
train_cfg = {{_base_.shapes_schedule.train_cfg}}
param_scheduler = {{_base_.shapes_schedule.param_scheduler}}
default_hooks = {{_base_.shapes_schedule.default_hooks}}
custom_hooks = {{_base_.shapes_schedule.custom_hooks}}
optim_wrapper = dict(optimizer=dict(lr=1e-3), paramwise_cfg=dict(num_layers=5, layer_decay_rate=0.9))
auto_scale_lr = dict(enable=False)
randomness = dict(seed=0)
