# UperNet, InternImage-T, 512x512, 160k iterations (official mIoU ss/ms: 47.9 / 48.1).
_base_ = ['../_base_/upernet_internimage_ade20k.py']
