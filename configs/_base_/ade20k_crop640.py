# 640x640 crops (L/XL): training resize to (2560, 640), sliding-window inference.
# Names are prefixed so that this file can sit beside the recipe base.
crop640_size = (640, 640)
crop640_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='CheckSegLabels', num_classes=150, ignore_index=255),
    dict(type='RandomResize', scale=(2560, 640), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=(640, 640), cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
crop640_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2560, 640), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='CheckSegLabels', num_classes=150, ignore_index=255),
    dict(type='PackSegInputs'),
]
crop640_tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug',
         transforms=[
             [dict(type='Resize', scale=(int(2560 * r), int(640 * r)), keep_ratio=True)
              for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)],
             [dict(type='RandomFlip', prob=0.0, direction='horizontal'),
              dict(type='RandomFlip', prob=1.0, direction='horizontal')],
             [dict(type='LoadAnnotations', reduce_zero_label=True)],
             [dict(type='PackSegInputs')],
         ]),
]
