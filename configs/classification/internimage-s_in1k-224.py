# InternImage-S trained from scratch on ImageNet-1k at 224 for 300 epochs (official
# internimage_s_1k_224.yaml: 84.2 top-1). Recipe: configs/_base_/internimage_imagenet.py; here the
# variant's drop path and layer scale. Total batch 4096 = 32 GPUs x 128 images (the official
# also ran 8 x 512); auto_scale_lr rescales the lr (4e-3 = 5e-4 * 4096 / 512) for other totals.
_base_ = ['../_base_/internimage_imagenet.py']
model = dict(backbone=dict(arch='s', drop_path_rate=0.4, layer_scale=1e-5, with_cp=False))
train_dataloader = dict(batch_size=128)  # per GPU, 32 GPUs
auto_scale_lr = dict(base_batch_size=4096)
