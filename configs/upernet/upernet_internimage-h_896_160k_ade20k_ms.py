# Multi-scale (ratios 0.5-1.75 of the test scale) + flip test of
# upernet_internimage-h_896_160k_ade20k.py; for tools/test.py only.
_base_ = ['./upernet_internimage-h_896_160k_ade20k.py']
model = dict(_delete_=True, type='SegTTAModel', module={{_base_.model}})
test_dataloader = dict(dataset=dict(pipeline={{_base_.crop896_tta_pipeline}}))
