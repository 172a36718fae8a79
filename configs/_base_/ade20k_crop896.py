# 896x896 crops (H/G): training resize to (3584, 896), sliding-window inference.
crop896_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='CheckSegLabels', num_classes=150, ignore_index=255),
    dict(type='RandomResize', scale=(3584, 896), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=(896, 896), cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
crop896_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(3584, 896), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='CheckSegLabels', num_classes=150, ignore_index=255),
    dict(type='PackSegInputs'),
]
crop896_tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug',
         transforms=[
             [dict(type='Resize', scale=(int(3584 * r), int(896 * r)), keep_ratio=True)
              for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)],
             [dict(type='RandomFlip', prob=0.0, direction='horizontal'),
              dict(type='RandomFlip', prob=1.0, direction='horizontal')],
             [dict(type='LoadAnnotations', reduce_zero_label=True)],
             [dict(type='PackSegInputs')],
         ]),
]
