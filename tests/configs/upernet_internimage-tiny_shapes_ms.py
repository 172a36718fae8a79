# Multi-scale + flip test of the tiny UperNet.
_base_ = ['./upernet_internimage-tiny_shapes.py']
model = dict(_delete_=True, type='SegTTAModel', module={{_base_.model}})
test_dataloader = dict(dataset=dict(pipeline={{_base_.tta_pipeline}}))
