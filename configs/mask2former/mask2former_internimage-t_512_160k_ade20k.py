# Mask2Former, InternImage-T, 512x512, ADE20K, 160k iterations: NOT an official InternImage
# recipe (none was published at this size), for users without an H-class budget. It is
# mmseg 1.x's own Mask2Former ADE20K recipe (mask2former_r50_8xb2-160k_ade20k-512x512.py:
# 256-dim pixel decoder and transformer decoder, 100 queries, AdamW lr 1e-4 with the backbone
# at 0.1x and no weight decay on the query and level embeddings, gradient clipping 0.01, poly
# 0.9, 8 GPUs x 2 images) with the backbone of the UperNet-T recipe: InternImage-T from the
# official ImageNet-1k release, drop path 0.2, layer scale 1.0. No published mIoU to compare.
_base_ = ['mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['mmdet.models', 'internimage', 'internimage.engine', 'internimage.datasets'],
                      allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type='InternImage',
        arch='t',
        drop_path_rate=0.2,
        layer_scale=1.0,
        with_cp=False,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint='internimage://internimage_t_1k_224')),
    decode_head=dict(in_channels=[64, 128, 256, 512]))
train_dataloader = dict(dataset=dict(type='CheckedADE20KDataset'))
val_dataloader = dict(dataset=dict(type='CheckedADE20KDataset'))
test_dataloader = val_dataloader
# tools/train.py adds what makes a run safe to kill and resume (atomic checkpoint writes,
# NonFiniteLossHook, RandomStateHook): internimage.engine.runner_utils.make_training_reliable.
