# Cascade Mask R-CNN + FPN, InternImage-L, 3x multi-scale/crop schedule (official: 56.1 / 48.5).
_base_ = ['./cascade-mask-rcnn_internimage-l_fpn_1x_coco.py', '../_base_/coco_instance_ms_crop_3x.py']
train_dataloader = dict(dataset=dict(pipeline={{_base_.ms_crop_train_pipeline}}))
train_cfg = {{_base_.ms_crop_3x_schedule.train_cfg}}
param_scheduler = {{_base_.ms_crop_3x_schedule.param_scheduler}}
optim_wrapper = dict(optimizer=dict(lr=2e-4), paramwise_cfg=dict(layer_decay_rate=0.90))
