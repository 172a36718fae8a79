# Synthetic COCO-format shapes (internimage.datasets.synthetic.make_coco_shapes) under
# $INTERNIMAGE_SHAPES_COCO, as named pieces for the tiny detection configs (names must not
# clash with the detector bases: mmengine forbids keys shared among sibling bases).
shapes_data_root = '{{$INTERNIMAGE_SHAPES_COCO:data/shapes_coco/}}'
shapes_metainfo = dict(classes=('circle', 'square', 'triangle'))
shapes_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
shapes_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
shapes_dataloaders = dict(
    train=dict(batch_size=2, num_workers=0, persistent_workers=False,
               dataset=dict(data_root=shapes_data_root, metainfo=shapes_metainfo,
                            ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                            pipeline=shapes_train_pipeline)),
    val=dict(batch_size=2, num_workers=0, persistent_workers=False,
             dataset=dict(data_root=shapes_data_root, metainfo=shapes_metainfo,
                          ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                          pipeline=shapes_test_pipeline)),
    evaluator=dict(ann_file=shapes_data_root + 'annotations/instances_val.json', metric=['bbox', 'segm']))
# A short run: 1 epoch, warm-up over 4 iterations, lr 1e-3, a log line per iteration.
shapes_schedule = dict(
    train_cfg=dict(max_epochs=1, val_interval=1),
    param_scheduler=[dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)],
    default_hooks=dict(logger=dict(interval=1)),
    # the cross-rank parameter check; tools/train.py adds the reliability hooks, as for every config
    custom_hooks=[dict(type='ParamSyncCheckHook')])
