"""InternImage image classifier: the backbone plus the official classification heads."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ops_dcnv3.modules import build_act_layer, build_norm_layer
from ops_dcnv3.packed_linear import conv_sequential

from .backbone import InternImage, _is_int, _is_number
from .variants import CLASSIFIER_HEAD, variant_name


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over keys ``k`` and values ``v`` (H/G head)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 out_dim=None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.k_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, out_dim or dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x, linear, bias):
        b, n, _ = x.shape
        return F.linear(x, linear.weight, bias).reshape(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(self, x, k, v):
        b, n, _ = x.shape
        q = self._heads(x, self.q, self.q_bias) * self.scale
        k = self._heads(k, self.k, self.k_bias)
        v = self._heads(v, self.v, self.v_bias)
        attn = self.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(x))


class AttentionPoolingBlock(nn.Module):
    """Pools a token sequence into one vector: the mean token attends over all tokens."""

    def __init__(self, dim, num_heads, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0, norm_layer="LN",
                 out_dim=None):
        super().__init__()
        self.norm1_q = build_norm_layer(dim, norm_layer, eps=1e-6)
        self.norm1_k = build_norm_layer(dim, norm_layer, eps=1e-6)
        self.norm1_v = build_norm_layer(dim, norm_layer, eps=1e-6)
        self.cross_dcn = CrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                        attn_drop=attn_drop, proj_drop=drop, out_dim=out_dim)

    def forward(self, x):
        query = self.norm1_q(x.mean(1, keepdim=True))
        x = self.cross_dcn(query, k=self.norm1_k(x), v=self.norm1_v(x))
        return x.squeeze(1)


class InternImageClassifier(InternImage):
    """InternImage for image classification, with the official constructor and state-dict keys.

    T/S/B/L/XL use a 1x1 conv head (``num_features * cls_scale`` channels) + BN + act,
    average pooling and a linear classifier. H/G (``use_clip_projector=True``) fuse the
    last two stages with 1x1 convs (stage 4 pixel-shuffled to stage 3's resolution),
    pool with attention, normalise (``fc_norm``) and classify.

    Args:
        arch: as for :class:`InternImage` (default ``'t'``); also picks the head
            (``use_clip_projector`` for H/G) unless given.
        num_classes: classes of the linear classifier; 0 gives pooled features.
        cls_scale: width of the 1x1 conv head relative to the last stage (T..XL).
        use_clip_projector: the attention-pooling head of H/G (default: the arch's).
        **backbone_kwargs: any other :class:`InternImage` argument (``drop_path_rate``,
            ``layer_scale``, ``with_cp``, ``init_cfg``, ...). With
            ``init_cfg=dict(type='Pretrained', checkpoint=...)`` the whole classifier, head
            included, is loaded (a head with another class count is skipped with a log line).

    The timm model interface: ``forward_features(x)`` returns the last feature map (NCHW;
    for H/G the fused map of stages 3 and 4 that the projector pools), ``forward_head(x,
    pre_logits=False)`` pools and classifies it, ``forward(x)`` does both.
    """

    def __init__(self, arch=None, num_classes: int = 1000, cls_scale: float = 1.5,
                 use_clip_projector: Optional[bool] = None, **backbone_kwargs):
        if not _is_int(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no classifier, features only), "
                             f"got {num_classes!r}")
        if not _is_number(cls_scale) or cls_scale <= 0:
            raise ValueError(f"cls_scale must be a number > 0, got {cls_scale!r}")
        if use_clip_projector is None:
            use_clip_projector = isinstance(arch, str) and CLASSIFIER_HEAD[variant_name(arch)]["use_clip_projector"]
        super().__init__(arch=arch, **backbone_kwargs)
        channels = self.channels
        if not use_clip_projector and int(channels * 8 * cls_scale) < 1:
            raise ValueError(f"cls_scale={cls_scale!r} leaves the classification head no channels "
                             f"(int({channels * 8} * {cls_scale}) = 0)")
        self.num_classes = num_classes
        self.use_clip_projector = use_clip_projector
        act_layer = backbone_kwargs.get("act_layer", "GELU")
        norm_layer = backbone_kwargs.get("norm_layer", "LN")
        if not use_clip_projector:
            head_features = int(self.num_features * cls_scale)
            self.conv_head = nn.Sequential(
                nn.Conv2d(self.num_features, head_features, kernel_size=1, bias=False),
                build_norm_layer(head_features, "BN", "channels_first", "channels_first"),
                build_act_layer(act_layer))
            self.head = nn.Linear(head_features, num_classes) if num_classes > 0 else nn.Identity()
            self._head_in_features = head_features
        else:
            pretrain_embed_dim, upscale, attn_heads, clip_embed_dim = 1024, 2, 16, 768
            self.dcnv3_head_x4 = nn.Sequential(
                nn.Conv2d(self.num_features, pretrain_embed_dim * upscale ** 2, kernel_size=1),
                nn.PixelShuffle(upscale))
            self.dcnv3_head_x3 = nn.Conv2d(self.num_features // 2, pretrain_embed_dim, kernel_size=1)
            self.clip_projector = AttentionPoolingBlock(pretrain_embed_dim, num_heads=attn_heads, qkv_bias=True,
                                                        norm_layer=norm_layer, out_dim=clip_embed_dim)
            self.fc_norm = build_norm_layer(clip_embed_dim, norm_layer, eps=1e-6)
            self.head = nn.Linear(clip_embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            self._head_in_features = clip_embed_dim
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        heads = ([self.conv_head, self.head] if not use_clip_projector else
                 [self.dcnv3_head_x4, self.dcnv3_head_x3, self.clip_projector, self.fc_norm, self.head])
        for head in heads:
            head.apply(self._init_module)

    def init_weights(self):
        """``init_cfg=dict(type='Pretrained', ...)`` loads the whole classifier, head included."""
        if isinstance(self.init_cfg, dict) and self.init_cfg.get("type") == "Pretrained" \
                and self.init_cfg.get("checkpoint") is not None:
            from ..checkpoint import load_classifier_weights

            load_classifier_weights(self, self.init_cfg["checkpoint"],
                                    map_location=self.init_cfg.get("map_location", "cpu"),
                                    head_22k_to_1k=self.init_cfg.get("head_22k_to_1k", True))
            self._is_init = True
            return
        super().init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, NCHW: stage 4 (T..XL), or stages 3 and 4 fused (H/G)."""
        return self._last_features(self.forward_stages(x))  # the last stage has no downsampling

    def _last_features(self, stages):
        *_, x3, x4 = stages
        if not self.use_clip_projector:
            return x4.permute(0, 3, 1, 2)
        return self.dcnv3_head_x4(x4.permute(0, 3, 1, 2)) + self.dcnv3_head_x3(x3.permute(0, 3, 1, 2))

    # --- timm's model interface (feature extraction, classifier access) ---------------

    @property
    def feature_info(self):
        """Stage outputs as timm describes them (channels, stride, module)."""
        return [dict(num_chs=self.channels * 2 ** i, reduction=4 * 2 ** i, module=f"levels.{i}")
                for i in range(len(self.levels))]

    def _take_indices(self, indices):
        count = len(self.levels)
        if indices is None:
            take = list(range(count))
        elif isinstance(indices, int):
            take = list(range(count - indices, count))
        else:
            take = [i + count if i < 0 else i for i in indices]
        if not take or any(not 0 <= i < count for i in take):
            raise ValueError(f"stage indices must be within 0..{count - 1} (or negative from the end), got {indices!r}")
        return take

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API: the stage outputs in ``indices`` (NCHW; all stages by default,
        an int n for the last n), and unless ``intermediates_only`` the last feature map too.
        ``norm`` has no effect: each stage already ends in its norm (or post-norms)."""
        if output_fmt != "NCHW":
            raise ValueError(f"InternImage features are NCHW; output_fmt {output_fmt!r} is not supported")
        take = self._take_indices(indices)
        last = max(take) if (stop_early or intermediates_only) else None
        stages = self.forward_stages(x, last=last)
        intermediates = [stages[i].permute(0, 3, 1, 2) for i in take]
        if intermediates_only:
            return intermediates
        return self._last_features(stages), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """Drop the stages after the last one in ``indices`` and, with ``prune_head``, the
        classification head (for ``timm.create_model(..., features_only=True)``)."""
        take = self._take_indices(indices)
        self.levels = self.levels[:max(take) + 1]
        if prune_head:
            for name in ("conv_head", "dcnv3_head_x4", "dcnv3_head_x3", "clip_projector", "fc_norm"):
                if hasattr(self, name):
                    setattr(self, name, nn.Identity())
            self.reset_classifier(0)
        return take

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int):
        """A new (initialised) linear classifier for ``num_classes`` (0: none, pooled features)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self._head_in_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_module)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the feature map and classify it; ``pre_logits=True`` stops before the classifier."""
        if not self.use_clip_projector:
            x = torch.flatten(self.avgpool(conv_sequential(self.conv_head, x)), 1)
        else:
            x = self.fc_norm(self.clip_projector(x.flatten(2).transpose(1, 2)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
