"""The seven released InternImage classifiers as timm models, registered on ``import internimage``.

    import internimage, timm
    model = timm.create_model("internimage_t_1k_224", pretrained=True)          # official weights
    model = timm.create_model("internimage_t_1k_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file="internimage_t_1k_224.pth"))  # a local copy
    feats = timm.create_model("internimage_b_1k_224", features_only=True, out_indices=(1, 2, 3))

Each model's ``pretrained_cfg`` states the official evaluation's preprocessing (input size,
crop, bicubic, ImageNet mean/std), so ``timm.data.resolve_data_config({}, model=model)`` and
``create_transform`` give it. Weights are read by timm with ``weights_only=True``; the
pretrained filter accepts every layout the project reads (``{'model': ...}``, mmengine
``state_dict``, the hub's ``model.``-prefixed keys) and cuts a 21,841-class head to 1,000.
"""
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..checkpoint.hub import KEY_PREFIX, hub_to_official_key
from .classifier import InternImageClassifier
from .variants import DEFAULT_PRETRAINED, PRETRAINED_CFGS, classifier_config, data_config

TIMM_MODELS = tuple(DEFAULT_PRETRAINED.values())


def _pretrained_cfg(release: str) -> dict:
    preprocessing = data_config(release)
    return dict(url=PRETRAINED_CFGS[release]["url"], num_classes=PRETRAINED_CFGS[release]["num_classes"],
                input_size=preprocessing["input_size"], crop_pct=preprocessing["crop_pct"],
                crop_mode=preprocessing["crop_mode"], interpolation=preprocessing["interpolation"],
                mean=preprocessing["mean"], std=preprocessing["std"], first_conv="patch_embed.conv1",
                classifier="head", license="mit", paper_ids="arXiv:2211.05778",
                origin_url="https://github.com/OpenGVLab/InternImage")


default_cfgs = generate_default_cfgs({name: _pretrained_cfg(name) for name in TIMM_MODELS})


def checkpoint_filter_fn(state_dict: dict, model: InternImageClassifier) -> dict:
    """Official weights in any layout the project reads, for ``model`` (timm's pretrained filter)."""
    from ..checkpoint import map_head_22k_to_1k, to_state_dict

    state_dict = to_state_dict(state_dict)
    if state_dict and all(k.startswith(KEY_PREFIX) for k in state_dict):  # Hugging Face hub layout
        state_dict = {hub_to_official_key(k): v for k, v in state_dict.items()}
    return map_head_22k_to_1k(state_dict, model.num_classes)


def _create(release: str, pretrained: bool = False, **kwargs) -> InternImageClassifier:
    in_chans = kwargs.pop("in_chans", 3)
    if in_chans != 3:
        raise ValueError(f"InternImage takes RGB input; in_chans={in_chans} is not supported")
    arch = PRETRAINED_CFGS[release]["arch"]
    model_kwargs = dict(classifier_config(arch), **kwargs)
    return build_model_with_cfg(InternImageClassifier, release, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
                                kwargs_filter=("in_chans",), **model_kwargs)


@register_model
def internimage_t_1k_224(pretrained=False, **kwargs) -> InternImageClassifier:
    return _create("internimage_t_1k_224", pretrained, **kwargs)


@register_model
def internimage_s_1k_224(pretrained=False, **kwargs) -> InternImageClassifier:
    return _create("internimage_s_1k_224", pretrained, **kwargs)


@register_model
def internimage_b_1k_224(pretrained=False, **kwargs) -> InternImageClassifier:
    return _create("internimage_b_1k_224", pretrained, **kwargs)


@register_model
def internimage_l_22kto1k_384(pretrained=False, **kwargs) -> InternImageClassifier:
    return _create("internimage_l_22kto1k_384", pretrained, **kwargs)


@register_model
def internimage_xl_22kto1k_384(pretrained=False, **kwargs) -> InternImageClassifier:
    return _create("internimage_xl_22kto1k_384", pretrained, **kwargs)


@register_model
def internimage_h_22kto1k_640(pretrained=False, **kwargs) -> InternImageClassifier:
    return _create("internimage_h_22kto1k_640", pretrained, **kwargs)


@register_model
def internimage_g_22kto1k_512(pretrained=False, **kwargs) -> InternImageClassifier:
    return _create("internimage_g_22kto1k_512", pretrained, **kwargs)
