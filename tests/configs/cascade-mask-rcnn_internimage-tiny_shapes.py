# A tiny Cascade Mask R-CNN on the InternImage-L config's code path (post-norm, offset
# scale 2, gradient checkpointing, three 4-conv + 1-fc GIoU heads), for CPU tests.
_base_ = ['../../configs/cascade_mask_rcnn/cascade-mask-rcnn_internimage-l_fpn_1x_coco.py', './_shapes_coco.py']


def _head(stds):  # the L config's head, narrow (a list in a child config replaces the base's)
    return dict(type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1, in_channels=32, conv_out_channels=32,
                fc_out_channels=64, roi_feat_size=7, num_classes=3,
                bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4, target_stds=stds),
                reg_class_agnostic=False, reg_decoded_bbox=True, norm_cfg=dict(type='SyncBN', requires_grad=True),
                loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


model = dict(
    backbone=dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], mlp_ratio=2.0, drop_path_rate=0.0,
                  init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=[_head([0.1, 0.1, 0.2, 0.2]), _head([0.05, 0.05, 0.1, 0.1]),
                   _head([0.033, 0.033, 0.067, 0.067])],
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32, num_classes=3)),
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
