# Multi-scale (ratios 768/896 to 1024/896 of the (3584, 896) test scale, the official
# ones) + flip test of mask2former_internimage-h_896_80k_cocostuff2ade20k_ss.py; for
# tools/test.py only.
_base_ = ['./mask2former_internimage-h_896_80k_cocostuff2ade20k_ss.py']
model = dict(_delete_=True, type='SegTTAModel', module={{_base_.model}})
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug',
         transforms=[
             [dict(type='Resize', scale=(int(3584 * r / 896), int(r)), keep_ratio=True)
              for r in (768, 832, 896, 960, 1024)],
             [dict(type='RandomFlip', prob=0.0, direction='horizontal'),
              dict(type='RandomFlip', prob=1.0, direction='horizontal')],
             [dict(type='LoadAnnotations', reduce_zero_label=True)],
             [dict(type='PackSegInputs')],
         ]),
]
test_dataloader = dict(dataset=dict(pipeline=tta_pipeline))
