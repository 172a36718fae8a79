"""InternImage image classifier: the backbone plus the official classification heads."""
import torch
import torch.nn.functional as F
from torch import nn

from ops_dcnv3.modules import build_act_layer, build_norm_layer

from .backbone import InternImage, _is_int, _is_number


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

    Takes the backbone's arguments (see :class:`InternImage`) plus ``num_classes``,
    ``cls_scale`` and ``use_clip_projector``; ``forward(x)`` returns logits. Settings that
    cannot build a working model are a ``ValueError`` naming the argument. The defaults
    are InternImage-T's architecture (the official class's defaults, groups 3/6/12/24 on
    64 channels, do not divide the channels and cannot be built).
    """

    def __init__(self, core_op="DCNv3", channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32),
                 num_classes=1000, mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.2, drop_path_type="linear",
                 act_layer="GELU", norm_layer="LN", layer_scale=None, offset_scale=1.0, post_norm=False,
                 cls_scale=1.5, with_cp=False, dw_kernel_size=None, use_clip_projector=False,
                 level2_post_norm=False, level2_post_norm_block_ids=None, res_post_norm=False,
                 center_feature_scale=False, remove_center=False, **kwargs):
        if not _is_int(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no classifier, features only), "
                             f"got {num_classes!r}")
        if not _is_number(cls_scale) or cls_scale <= 0:
            raise ValueError(f"cls_scale must be a number > 0, got {cls_scale!r}")
        if not use_clip_projector and _is_int(channels) and channels > 0 and int(channels * 8 * cls_scale) < 1:
            raise ValueError(f"cls_scale={cls_scale!r} leaves the classification head no channels "
                             f"(int({channels * 8} * {cls_scale}) = 0)")
        super().__init__(core_op=core_op, channels=channels, depths=depths, groups=groups, mlp_ratio=mlp_ratio,
                         drop_rate=drop_rate, drop_path_rate=drop_path_rate, drop_path_type=drop_path_type,
                         act_layer=act_layer, norm_layer=norm_layer, layer_scale=layer_scale,
                         offset_scale=offset_scale, post_norm=post_norm, with_cp=with_cp,
                         dw_kernel_size=dw_kernel_size, level2_post_norm=level2_post_norm,
                         level2_post_norm_block_ids=level2_post_norm_block_ids, res_post_norm=res_post_norm,
                         center_feature_scale=center_feature_scale, remove_center=remove_center, **kwargs)
        self.num_classes = num_classes
        self.use_clip_projector = use_clip_projector
        if not use_clip_projector:
            head_features = int(self.num_features * cls_scale)
            self.conv_head = nn.Sequential(
                nn.Conv2d(self.num_features, head_features, kernel_size=1, bias=False),
                build_norm_layer(head_features, "BN", "channels_first", "channels_first"),
                build_act_layer(act_layer))
            self.head = nn.Linear(head_features, num_classes) if num_classes > 0 else nn.Identity()
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
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        heads = ([self.conv_head, self.head] if not use_clip_projector else
                 [self.dcnv3_head_x4, self.dcnv3_head_x3, self.clip_projector, self.fc_norm, self.head])
        for head in heads:
            head.apply(self._init_module)

    def forward_features(self, x):
        """Pooled features before the classifier (T/S/B/L/XL head)."""
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            x = level(x)
        x = self.conv_head(x.permute(0, 3, 1, 2))
        return torch.flatten(self.avgpool(x), 1)

    def forward_clip_projector(self, x):
        """Pooled features before the classifier (H/G head)."""
        *_, x3, x4 = self.forward_stages(x)
        x = self.dcnv3_head_x4(x4.permute(0, 3, 1, 2)) + self.dcnv3_head_x3(x3.permute(0, 3, 1, 2))
        x = self.clip_projector(x.flatten(2).transpose(1, 2))
        return self.fc_norm(x)

    def forward(self, x):
        x = self.forward_clip_projector(x) if self.use_clip_projector else self.forward_features(x)
        return self.head(x)
