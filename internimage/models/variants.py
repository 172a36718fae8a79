"""The InternImage variant table, the one place that states each architecture, and the
released checkpoints.

Two tables, as timm separates a model from its ``default_cfgs``:

* :data:`ARCH_SETTINGS`: what makes a variant (channels, depths, groups, offset scale,
  norm placement, the H/G extras). ``InternImage(arch='l')`` reads it; explicit keyword
  arguments override it.
* :data:`PRETRAINED_CFGS`: what belongs to a released file (its URL, input size and test
  crop, classes, and the drop path and layer scale of the classifier it was trained as).

``DEFAULT_PRETRAINED`` names, for each variant, the release ``build_model(name,
pretrained=True)`` loads (the ImageNet-1k classifier), and ``BACKBONE_PRETRAINED`` the one
the detection and segmentation configs start from (the official recipes: ImageNet-1k for
T/S/B, ImageNet-22k for L/XL, joint / pre-training for H/G).
"""
from typing import Dict, Optional, Tuple, Union

OFFICIAL_URL = "https://huggingface.co/OpenGVLab/InternImage/resolve/main/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_H_G_EXTRAS = dict(dw_kernel_size=5, level2_post_norm=True, center_feature_scale=True)

ARCH_SETTINGS: Dict[str, dict] = {
    "t": dict(channels=64, depths=[4, 4, 18, 4], groups=[4, 8, 16, 32], offset_scale=1.0, post_norm=False),
    "s": dict(channels=80, depths=[4, 4, 21, 4], groups=[5, 10, 20, 40], offset_scale=1.0, post_norm=True),
    "b": dict(channels=112, depths=[4, 4, 21, 4], groups=[7, 14, 28, 56], offset_scale=1.0, post_norm=True),
    "l": dict(channels=160, depths=[5, 5, 22, 5], groups=[10, 20, 40, 80], offset_scale=2.0, post_norm=True),
    "xl": dict(channels=192, depths=[5, 5, 24, 5], groups=[12, 24, 48, 96], offset_scale=2.0, post_norm=True),
    "h": dict(channels=320, depths=[6, 6, 32, 6], groups=[10, 20, 40, 80], offset_scale=1.0, post_norm=False,
              res_post_norm=True, level2_post_norm_block_ids=[5, 11, 17, 23, 29], **_H_G_EXTRAS),
    "g": dict(channels=512, depths=[2, 2, 48, 4], groups=[16, 32, 64, 128], offset_scale=1.0, post_norm=True,
              level2_post_norm_block_ids=[5, 11, 17, 23, 29, 35, 41, 47], **_H_G_EXTRAS),
}

# The classifier's head differs by variant too: H/G pool with the CLIP-style attention projector.
CLASSIFIER_HEAD: Dict[str, dict] = {name: dict(use_clip_projector=name in ("h", "g")) for name in ARCH_SETTINGS}


def _release(arch, file, input_size, drop_path_rate, layer_scale, num_classes=1000, crop_pct=None):
    # Test-time transform of the official code: at 224, resize the short side to 224/0.875
    # and centre-crop; above 224, resize straight to the input size.
    crop_pct = crop_pct if crop_pct is not None else (0.875 if input_size == 224 else 1.0)
    return dict(arch=arch, url=OFFICIAL_URL + file, file=file, input_size=input_size, crop_pct=crop_pct,
                num_classes=num_classes, drop_path_rate=drop_path_rate, layer_scale=layer_scale)


PRETRAINED_CFGS: Dict[str, dict] = {
    # ImageNet-1k classifiers
    "internimage_t_1k_224": _release("t", "internimage_t_1k_224.pth", 224, 0.1, None),
    "internimage_s_1k_224": _release("s", "internimage_s_1k_224.pth", 224, 0.4, 1e-5),
    "internimage_b_1k_224": _release("b", "internimage_b_1k_224.pth", 224, 0.5, 1e-5),
    "internimage_l_22kto1k_384": _release("l", "internimage_l_22kto1k_384.pth", 384, 0.1, 1e-5),
    "internimage_xl_22kto1k_384": _release("xl", "internimage_xl_22kto1k_384.pth", 384, 0.2, 1e-5),
    "internimage_h_22kto1k_640": _release("h", "internimage_h_22kto1k_640.pth", 640, 0.2, None),
    "internimage_g_22kto1k_512": _release("g", "internimage_g_22kto1k_512.pth", 512, 0.4, None),
    # Pre-trained backbones of the detection / segmentation recipes
    "internimage_l_22k_384": _release("l", "internimage_l_22k_192to384.pth", 384, 0.1, 1e-5, num_classes=21841),
    "internimage_xl_22k_384": _release("xl", "internimage_xl_22k_192to384.pth", 384, 0.2, 1e-5,
                                       num_classes=21841),
    "internimage_h_jointto22k_384": _release("h", "internimage_h_jointto22k_384.pth", 384, 0.2, None,
                                             num_classes=21841),
    "internimage_g_pretrainto22k_384": _release("g", "internimage_g_pretrainto22k_384.pth", 384, 0.4, None,
                                                num_classes=21841),
}

DEFAULT_PRETRAINED = {"t": "internimage_t_1k_224", "s": "internimage_s_1k_224", "b": "internimage_b_1k_224",
                      "l": "internimage_l_22kto1k_384", "xl": "internimage_xl_22kto1k_384",
                      "h": "internimage_h_22kto1k_640", "g": "internimage_g_22kto1k_512"}
BACKBONE_PRETRAINED = {"t": "internimage_t_1k_224", "s": "internimage_s_1k_224", "b": "internimage_b_1k_224",
                       "l": "internimage_l_22k_384", "xl": "internimage_xl_22k_384",
                       "h": "internimage_h_jointto22k_384", "g": "internimage_g_pretrainto22k_384"}


def variant_name(name: str) -> str:
    """'internimage_t', 'InternImage-T' or 't' -> 't'."""
    key = name.lower().replace("-", "_")
    key = key[len("internimage_"):] if key.startswith("internimage_") else key
    if key not in ARCH_SETTINGS:
        raise KeyError(f"unknown InternImage variant {name!r}; choose from "
                       f"{', '.join('internimage_' + k for k in ARCH_SETTINGS)}")
    return key


def arch_settings(arch: Union[str, dict]) -> dict:
    """The architecture keyword arguments of ``arch``: a variant name ('t'..'g',
    'internimage_t', ...) or a dict of the same keys, returned as a copy."""
    if isinstance(arch, dict):
        unknown = sorted(set(arch) - set(ARCH_KEYS))
        if unknown:
            raise ValueError(f"arch dict has keys that are not architecture settings: {unknown}; "
                             f"allowed: {list(ARCH_KEYS)}")
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in arch.items()}
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a variant name or a dict, got {type(arch).__name__}")
    return {k: (list(v) if isinstance(v, list) else v) for k, v in ARCH_SETTINGS[variant_name(arch)].items()}


# Every setting a variant may state (the union of the table's keys).
ARCH_KEYS = ("channels", "depths", "groups", "offset_scale", "post_norm", "res_post_norm", "dw_kernel_size",
             "level2_post_norm", "level2_post_norm_block_ids", "center_feature_scale")


def classifier_config(name: str, **overrides) -> dict:
    """Keyword arguments of :class:`internimage.InternImageClassifier` for a variant, with the
    drop path and layer scale of its default release (what ``build_model`` uses)."""
    key = variant_name(name)
    release = PRETRAINED_CFGS[DEFAULT_PRETRAINED[key]]
    cfg = dict(arch=key, drop_path_rate=release["drop_path_rate"], layer_scale=release["layer_scale"],
               **CLASSIFIER_HEAD[key])
    cfg.update(overrides)
    return cfg


def pretrained_url(name: str) -> str:
    """URL of a release (``'internimage_l_22k_384'``) or of a variant's default one (``'l'``)."""
    if name in PRETRAINED_CFGS:
        return PRETRAINED_CFGS[name]["url"]
    try:
        return PRETRAINED_CFGS[DEFAULT_PRETRAINED[variant_name(name)]]["url"]
    except KeyError:
        raise KeyError(f"unknown InternImage release {name!r}; choose from {', '.join(PRETRAINED_CFGS)} "
                       f"or a variant {', '.join(ARCH_SETTINGS)}") from None


# Compound scaling of the paper (section 3.3): depth grows by ALPHA ** phi and width by
# BETA ** phi, with ALPHA * BETA ** 1.99 close to 2 (each step about doubles the FLOPs).
ALPHA, BETA = 1.09, 1.36


def scaled_variant(c1: int, group_channels: int, l1: int, l3: int, l4: Optional[int] = None, **options) -> dict:
    """Constructor settings of a variant given the paper's four numbers: ``c1`` channels of
    stage 1 (doubling at each stage), ``group_channels`` (C') channels per DCNv3 group, and
    the depths of the "AABA" pattern ``[l1, l1, l3, l1]`` (``l4`` for a last stage deeper than
    the first ones, as G's ``[2, 2, 48, 4]``). ``options`` are other architecture settings
    (``offset_scale``, ``post_norm``, the H/G extras ...) and are returned with them::

        InternImage(arch=scaled_variant(96, 16, 4, 20, post_norm=True))   # a size between S and B
    """
    for name, value in (("c1", c1), ("group_channels", group_channels), ("l1", l1), ("l3", l3)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if c1 % group_channels:
        raise ValueError(f"c1={c1} must be a multiple of group_channels={group_channels} (groups = channels / C')")
    unknown = sorted(set(options) - set(ARCH_KEYS))
    if unknown:
        raise ValueError(f"unknown architecture settings {unknown}; allowed: {list(ARCH_KEYS)}")
    depths = [l1, l1, l3, l1 if l4 is None else l4]
    groups = [c1 * 2 ** i // group_channels for i in range(4)]
    return dict(channels=c1, depths=depths, groups=groups, **options)


def compound_scaling(phi: float) -> Tuple[float, float]:
    """(depth factor, width factor) of scaling step ``phi``: ``ALPHA ** phi, BETA ** phi``."""
    return ALPHA ** phi, BETA ** phi


def data_config(name: str) -> dict:
    """timm's data config (what ``timm.data.create_transform`` takes) of the official evaluation
    of a release (``'internimage_l_22kto1k_384'``) or of a variant's default one (``'l'``):
    bicubic, ImageNet mean/std; at 224 the short side resized to 256 and the centre
    cropped, above 224 the image resized to the input size ('squash')."""
    release = PRETRAINED_CFGS.get(name) or PRETRAINED_CFGS[DEFAULT_PRETRAINED[variant_name(name)]]
    size = release["input_size"]
    return dict(input_size=(3, size, size), interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                crop_pct=release["crop_pct"], crop_mode="center" if release["crop_pct"] < 1 else "squash")


# Classifier kwargs of each variant's default release, for code that iterates the variants.
VARIANTS: Dict[str, dict] = {
    key: dict(arch_settings(key), **{k: v for k, v in classifier_config(key).items() if k != "arch"})
    for key in ARCH_SETTINGS
}
