"""The InternImage variant table: constructor settings of each released model.

Architecture settings are those of the official classification configs; checkpoint
names are the official ImageNet releases (``OFFICIAL_URL`` + name).
"""
OFFICIAL_URL = "https://huggingface.co/OpenGVLab/InternImage/resolve/main/"

_H_G_COMMON = dict(dw_kernel_size=5, level2_post_norm=True, center_feature_scale=True, use_clip_projector=True)

VARIANTS = {
    "t": dict(channels=64, depths=[4, 4, 18, 4], groups=[4, 8, 16, 32], offset_scale=1.0, layer_scale=None,
              post_norm=False, drop_path_rate=0.1),
    "s": dict(channels=80, depths=[4, 4, 21, 4], groups=[5, 10, 20, 40], offset_scale=1.0, layer_scale=1e-5,
              post_norm=True, drop_path_rate=0.4),
    "b": dict(channels=112, depths=[4, 4, 21, 4], groups=[7, 14, 28, 56], offset_scale=1.0, layer_scale=1e-5,
              post_norm=True, drop_path_rate=0.5),
    "l": dict(channels=160, depths=[5, 5, 22, 5], groups=[10, 20, 40, 80], offset_scale=2.0, layer_scale=1e-5,
              post_norm=True, drop_path_rate=0.1),
    "xl": dict(channels=192, depths=[5, 5, 24, 5], groups=[12, 24, 48, 96], offset_scale=2.0, layer_scale=1e-5,
               post_norm=True, drop_path_rate=0.2),
    "h": dict(channels=320, depths=[6, 6, 32, 6], groups=[10, 20, 40, 80], offset_scale=1.0, layer_scale=None,
              post_norm=False, res_post_norm=True, level2_post_norm_block_ids=[5, 11, 17, 23, 29],
              drop_path_rate=0.2, **_H_G_COMMON),
    "g": dict(channels=512, depths=[2, 2, 48, 4], groups=[16, 32, 64, 128], offset_scale=1.0, layer_scale=None,
              post_norm=True, level2_post_norm_block_ids=[5, 11, 17, 23, 29, 35, 41, 47],
              drop_path_rate=0.2, **_H_G_COMMON),
}

# Input resolution of each released classification checkpoint, and its file name.
IMAGE_SIZE = {"t": 224, "s": 224, "b": 224, "l": 384, "xl": 384, "h": 640, "g": 512}
PRETRAINED = {
    "t": "internimage_t_1k_224.pth",
    "s": "internimage_s_1k_224.pth",
    "b": "internimage_b_1k_224.pth",
    "l": "internimage_l_22k_192to384.pth",
    "xl": "internimage_xl_22k_192to384.pth",
    "h": "internimage_h_jointto22k_384.pth",
    "g": "internimage_g_pretrainto22k_384.pth",
}


def variant_name(name: str) -> str:
    """'internimage_t', 'InternImage-T' or 't' -> 't'."""
    key = name.lower().replace("-", "_")
    key = key[len("internimage_"):] if key.startswith("internimage_") else key
    if key not in VARIANTS:
        raise KeyError(f"unknown InternImage variant {name!r}; choose from "
                       f"{', '.join('internimage_' + k for k in VARIANTS)}")
    return key


def backbone_config(name: str, **overrides) -> dict:
    """Keyword arguments of :class:`internimage.InternImage` for a variant (no classifier head)."""
    cfg = {k: v for k, v in VARIANTS[variant_name(name)].items() if k != "use_clip_projector"}
    cfg.update(overrides)
    return cfg
