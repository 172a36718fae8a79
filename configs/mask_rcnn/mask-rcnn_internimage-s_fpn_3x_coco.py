# Mask R-CNN + FPN, InternImage-S, 3x schedule (official: 49.7 / 44.5 box / mask mAP).
_base_ = ['./mask-rcnn_internimage-s_fpn_1x_coco.py', '../_base_/coco_instance_ms_crop_3x.py']
train_dataloader = dict(dataset=dict(pipeline={{_base_.ms_crop_train_pipeline}}))
train_cfg = {{_base_.ms_crop_3x_schedule.train_cfg}}
param_scheduler = {{_base_.ms_crop_3x_schedule.param_scheduler}}
