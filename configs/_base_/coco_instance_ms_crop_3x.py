# Training pipeline of the official 3x recipe (DETR-style), as a named list that 3x
# configs plug in with `{{_base_.ms_crop_train_pipeline}}` (names here must not clash
# with the detector bases, which mmengine forbids among sibling bases): random flip, then
# either multi-scale resize (short side 480..800 step 32, long side <= 1333) or resize
# (400/500/600) + absolute-range crop 384x600 (negative crops allowed) + the same resize.
ms_crop_train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomChoice',
         transforms=[
             [dict(type='RandomChoiceResize', scales=[(s, 1333) for s in range(480, 801, 32)], keep_ratio=True)],
             [dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
              dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
              dict(type='RandomChoiceResize', scales=[(s, 1333) for s in range(480, 801, 32)], keep_ratio=True)],
         ]),
    dict(type='PackDetInputs'),
]
ms_crop_3x_schedule = dict(
    train_cfg=dict(max_epochs=36),
    param_scheduler=[
        dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
        dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
    ])
