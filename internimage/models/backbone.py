"""InternImage backbone (CVPR 2023): stem, four stages of DCNv3 blocks, downsampling.

Module and parameter names follow the official implementation, so official
checkpoints load unchanged (see :mod:`internimage.checkpoint`).
"""
import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from timm.layers import DropPath, trunc_normal_
from torch import nn

import ops_dcnv3
from ops_dcnv3.modules import build_act_layer, build_norm_layer
from ops_dcnv3.packed_linear import conv2d, inference_dtype, linear, packed_linear, release_packed_weights

from .gelu_mlp import gelu_mlp
from .variants import ARCH_KEYS, arch_settings

_ADD_LAYER_NORM_ = torch.ops.ops_dcnv3.add_layer_norm_.default  # residual sum in place, its LayerNorm

CORE_OPS = {"DCNv3": ops_dcnv3.DCNv3, "DCNv3_pytorch": ops_dcnv3.DCNv3_pytorch}

NUM_STAGES = 4


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite real number (not a bool, a string or None)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def _per_stage(name, value):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"{name} must be a list of {NUM_STAGES} positive integers (one per stage), got {value!r}")
    values = list(value)
    if len(values) != NUM_STAGES:
        raise ValueError(f"{name} must have {NUM_STAGES} entries (one per stage), got {len(values)}: {value!r}")
    for i, v in enumerate(values):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name}[{i}] must be an integer >= 1, got {v!r} (in {name}={value!r})")
    return values


def _is_empty_pretrained(init_cfg) -> bool:
    """``dict(type='Pretrained', checkpoint=None)``: a slot for ``--cfg-options
    model.backbone.init_cfg.checkpoint=PATH``, meaning "no weights to load" while empty."""
    return isinstance(init_cfg, dict) and init_cfg.get("type") == "Pretrained" and init_cfg.get("checkpoint") is None


def check_settings(channels, depths, groups, mlp_ratio, drop_rate, drop_path_rate, layer_scale, offset_scale,
                   dw_kernel_size, level2_post_norm, level2_post_norm_block_ids, out_indices, frozen_stages):
    """Reject settings that cannot build a working InternImage, naming the argument and
    its value (ValueError), before any layer is built."""
    if not _is_int(channels) or channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels!r}")
    depths = _per_stage("depths", depths)
    groups = _per_stage("groups", groups)
    for i, g in enumerate(groups):
        stage_channels = channels * 2 ** i
        if stage_channels % g != 0:
            raise ValueError(f"stage {i + 1} has {stage_channels} channels (channels={channels} * 2**{i}), "
                             f"not divisible by groups[{i}]={g}; groups={groups!r}")
    if not _is_number(mlp_ratio) or mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
    if int(channels * mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio={mlp_ratio!r} gives the MLPs of stage 1 no hidden units "
                         f"(int({channels} * {mlp_ratio}) = 0)")
    for name, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if not _is_number(value) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if layer_scale is not None and (not _is_number(layer_scale) or layer_scale < 0):
        raise ValueError(f"layer_scale must be None (no layer scale) or a number >= 0, got {layer_scale!r}")
    if not _is_number(offset_scale) or offset_scale < 0:
        raise ValueError(f"offset_scale must be a number >= 0, got {offset_scale!r}")
    if dw_kernel_size is not None and (not _is_int(dw_kernel_size) or dw_kernel_size < 1 or dw_kernel_size % 2 == 0):
        raise ValueError(f"dw_kernel_size must be None or an odd positive integer, got {dw_kernel_size!r}")
    if level2_post_norm and level2_post_norm_block_ids is not None:
        for block_id in level2_post_norm_block_ids:
            if not _is_int(block_id) or not 0 <= block_id < depths[2]:
                raise ValueError(f"level2_post_norm_block_ids must be block indices of stage 3, in [0, {depths[2]}), "
                                 f"got {level2_post_norm_block_ids!r}")
    if isinstance(out_indices, (str, bytes)) or not hasattr(out_indices, "__iter__"):
        raise ValueError(f"out_indices must be a sequence of stage indices in 0..{NUM_STAGES - 1}, "
                         f"e.g. (0, 1, 2, 3), got {out_indices!r}")
    indices = list(out_indices)
    if not indices:
        raise ValueError("out_indices must name at least one stage (indices in 0..3), got an empty sequence")
    for i in indices:
        if not _is_int(i) or not 0 <= i < NUM_STAGES:
            raise ValueError(f"out_indices must be stage indices in 0..{NUM_STAGES - 1}, got {out_indices!r}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"out_indices must not repeat a stage, got {out_indices!r}")
    if not _is_int(frozen_stages) or not -1 <= frozen_stages <= NUM_STAGES:
        raise ValueError(f"frozen_stages must be an integer in [-1, {NUM_STAGES}] (-1: nothing frozen, 0: the stem, "
                         f"i: the stem and stages 1..i), got {frozen_stages!r}")


class StemLayer(nn.Module):
    """Two stride-2 3x3 convs to 1/4 resolution: NCHW image in, NHWC features out."""

    def __init__(self, in_chans=3, out_chans=96, act_layer="GELU", norm_layer="BN"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = build_norm_layer(out_chans // 2, norm_layer, "channels_first", "channels_first")
        self.act = build_act_layer(act_layer)
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, kernel_size=3, stride=2, padding=1)
        self.norm2 = build_norm_layer(out_chans, norm_layer, "channels_first", "channels_last")

    def forward(self, x):
        return self.norm2(conv2d(self.conv2, self.act(self.norm1(conv2d(self.conv1, x)))))


class DownsampleLayer(nn.Module):
    """Stride-2 3x3 conv doubling the channels, NHWC in and out."""

    def __init__(self, channels, norm_layer="LN"):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = build_norm_layer(2 * channels, norm_layer, "channels_first", "channels_last")

    def forward(self, x):
        return self.norm(conv2d(self.conv, x.permute(0, 3, 1, 2)))


class MLPLayer(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout, on channels-last tokens.

    With GELU and no hooks on its layers it takes a fused path: in training, the GELU is
    recomputed in backward instead of stored (:mod:`internimage.models.gelu_mlp`); in
    inference, oneDNN linears with the GELU in place (:mod:`ops_dcnv3.packed_linear`; in bfloat16
    under autocast where the CPU has native bfloat16 kernels). Results equal the plain path up
    to rounding; hooks, tracing and dropout take the plain path.
    """

    def __init__(self, in_features, hidden_features, act_layer="GELU", drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = build_act_layer(act_layer)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        if isinstance(self.act, nn.GELU) and not self._hooked():
            if self._saves_memory(x):
                return gelu_mlp(x, self.fc1, self.fc2, self.act.approximate)
            if not self.training and self.act.approximate == "none":  # inference: oneDNN, GELU in place
                return linear(self.fc2, linear(self.fc1, x, gelu=True))
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def inference_ready(self) -> bool:
        """Whether :meth:`inference_forward` covers this layer (exact GELU)."""
        return type(self.act) is nn.GELU and self.act.approximate == "none"

    def inference_forward(self, x, dtype):
        """forward() on the packed inference path (see InternImageBlock.forward)."""
        return packed_linear(self.fc2, packed_linear(self.fc1, x, dtype, gelu=True), dtype)

    def _hooked(self):
        """Hooks on the layers: the fused paths would bypass them."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in (self.fc1, self.fc2, self.act))

    def _saves_memory(self, x):
        """Training without dropout or autocast, not tracing (the caller has checked the GELU and hooks)."""
        return (torch.is_grad_enabled() and self.drop.p == 0.0 and not torch.jit.is_tracing()
                and not torch.is_autocast_enabled(x.device.type)
                and (x.requires_grad or self.fc1.weight.requires_grad or self.fc2.weight.requires_grad))


class InternImageBlock(nn.Module):
    """One block: DCNv3 token mixer and MLP, each with a residual connection.

    Pre-norm by default; ``post_norm`` normalises the branch output instead,
    ``res_post_norm`` (InternImage-H) normalises the pre-norm branch output again,
    and ``layer_scale`` multiplies each branch by a learned per-channel gamma.
    """

    def __init__(self, core_op, channels, groups, mlp_ratio=4.0, drop=0.0, drop_path=0.0, act_layer="GELU",
                 norm_layer="LN", post_norm=False, layer_scale=None, offset_scale=1.0, with_cp=False,
                 dw_kernel_size=None, res_post_norm=False, center_feature_scale=False, remove_center=False):
        super().__init__()
        self.with_cp = with_cp
        self.post_norm = post_norm
        self.res_post_norm = res_post_norm
        self.norm1 = build_norm_layer(channels, "LN")
        self.dcn = core_op(channels=channels, kernel_size=3, stride=1, pad=1, dilation=1, group=groups,
                           offset_scale=offset_scale, act_layer=act_layer, norm_layer=norm_layer,
                           dw_kernel_size=dw_kernel_size, center_feature_scale=center_feature_scale,
                           remove_center=remove_center)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = build_norm_layer(channels, "LN")
        self.mlp = MLPLayer(channels, int(channels * mlp_ratio), act_layer=act_layer, drop=drop)
        self.layer_scale = layer_scale
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(channels))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(channels))
        if res_post_norm:
            self.res_post_norm1 = build_norm_layer(channels, "LN")
            self.res_post_norm2 = build_norm_layer(channels, "LN")

    def _branch(self, x, mixer, norm, res_norm, gamma):
        if self.post_norm:
            y = norm(mixer(x))
        elif self.res_post_norm:
            y = res_norm(mixer(norm(x)))
        else:
            y = mixer(norm(x))
        return y if gamma is None else gamma * y

    def _forward(self, x):
        gamma1 = self.gamma1 if self.layer_scale is not None else None
        gamma2 = self.gamma2 if self.layer_scale is not None else None
        x = x + self.drop_path(self._branch(x, self.dcn, self.norm1, getattr(self, "res_post_norm1", None), gamma1))
        x = x + self.drop_path(self._branch(x, self.mlp, self.norm2, getattr(self, "res_post_norm2", None), gamma2))
        return x

    def forward(self, x):
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        if not self.training and not torch.is_grad_enabled():
            dtype = self._inference_dtype(x)
            if dtype is not None:
                return self._inference_forward(x, dtype)
        return self._forward(x)

    def _inference_dtype(self, x):
        """The dtype of :meth:`_inference_forward` for input ``x``, or None where it does not apply
        (its structure, and ``packed_linear.inference_dtype``: no autograd, hooks on the block or
        any of its modules, training mode, ...)."""
        structure = self._inference_structure()
        return None if structure is None else inference_dtype(*structure, x)

    def _inference_structure(self):
        """(all submodules, the weights of the layers it uses) when _inference_forward covers
        the block's structure, else None. Cached: walking the modules at every call cost more
        than the path saves at batch 1; the cache holds while every submodule that has children
        keeps the same ones (the leaves it relies on are layers of exact types, whose forward
        uses no children)."""
        cached = self.__dict__.get("_inference_cache")
        if cached is not None and all(tuple(m._modules.values()) == children for m, children in cached[0]):
            return cached[1]
        norms = [self.norm1, self.norm2] + ([self.res_post_norm1, self.res_post_norm2] if self.res_post_norm else [])
        ready = (isinstance(self.dcn, ops_dcnv3.DCNv3) and self.dcn.inference_ready()
                 and isinstance(self.mlp, MLPLayer) and self.mlp.inference_ready()
                 and all(type(n) is nn.Sequential and len(n) == 1 and type(n[0]) is nn.LayerNorm for n in norms))
        modules = tuple(self.modules())
        structure = None
        if ready:
            weights = tuple(m.weight for m in modules
                            if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)) and m.weight is not None)
            structure = (modules, weights)
        self.__dict__["_inference_cache"] = (tuple((m, tuple(m._modules.values())) for m in modules if m._modules),
                                             structure)
        return structure

    def _pre_norm_fusable(self) -> bool:
        """Pre-norm with an affine second norm: the structure whose residual sums
        _inference_forward fuses with the following norms."""
        norm2 = self.norm2[0]
        return not (self.post_norm or self.res_post_norm) and norm2.weight is not None and norm2.bias is not None

    def _inference_forward(self, x, dtype, normed=None, next_norm=None):
        """_forward() in inference (checked by forward()): the same operations, the layers'
        products on oneDNN with packed weights (ops_dcnv3.packed_linear), called directly
        instead of through the layer modules and their per-call checks.

        A pre-norm block (:meth:`_pre_norm_fusable`) can also take its first norm's output
        ``normed`` (made by the block before it) and, given the LayerNorm that follows it
        (``next_norm``: the next block's first or the stage's), return ``(output,
        next_norm(output))`` with its last residual sum and that norm in one pass (see
        InternImageStage)."""
        def norm(sequential):
            layer = sequential[0] if sequential is not None else None
            return None if layer is None else (
                lambda t: F.layer_norm(t, layer.normalized_shape, layer.weight, layer.bias, layer.eps))

        gamma1 = self.gamma1 if self.layer_scale is not None else None
        gamma2 = self.gamma2 if self.layer_scale is not None else None
        norm1, norm2 = self.norm1[0], self.norm2[0]
        if self._pre_norm_fusable():
            # Pre-norm: each residual sum (in place on its branch's output) and the norm after it
            # in one pass over the pixels (ops_dcnv3.add_layer_norm_); without a next norm, the last
            # sum in place.
            if normed is None:
                normed = F.layer_norm(x, norm1.normalized_shape, norm1.weight, norm1.bias, norm1.eps)
            y = self.dcn.inference_forward(normed, dtype)
            h = _ADD_LAYER_NORM_(y, x, gamma1, norm2.weight, norm2.bias, norm2.eps)  # y: the sum
            h = self.mlp.inference_forward(h, dtype)
            if next_norm is None:
                return y.add_(h if gamma2 is None else h.mul_(gamma2))
            return h, _ADD_LAYER_NORM_(h, y, gamma2, next_norm.weight, next_norm.bias, next_norm.eps)  # h: the sum
        # Each branch's output is a new tensor of this function's: the sums are made in place
        # (x + y and y + x are the same sum).
        x = self._branch(x, lambda t: self.dcn.inference_forward(t, dtype), norm(self.norm1),
                         norm(getattr(self, "res_post_norm1", None)), gamma1).add_(x)
        return x.add_(self._branch(x, lambda t: self.mlp.inference_forward(t, dtype), norm(self.norm2),
                                   norm(getattr(self, "res_post_norm2", None)), gamma2))


class InternImageStage(nn.Module):
    """One stage: ``depth`` blocks, optional level-2 post norms (H/G), final norm, downsampling."""

    def __init__(self, core_op, channels, depth, groups, downsample=True, mlp_ratio=4.0, drop=0.0,
                 drop_path=0.0, act_layer="GELU", norm_layer="LN", post_norm=False, offset_scale=1.0,
                 layer_scale=None, with_cp=False, dw_kernel_size=None, post_norm_block_ids=None,
                 res_post_norm=False, center_feature_scale=False, remove_center=False):
        super().__init__()
        drop_paths = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList([
            InternImageBlock(core_op=core_op, channels=channels, groups=groups, mlp_ratio=mlp_ratio, drop=drop,
                             drop_path=drop_paths[i], act_layer=act_layer, norm_layer=norm_layer,
                             post_norm=post_norm, layer_scale=layer_scale, offset_scale=offset_scale,
                             with_cp=with_cp, dw_kernel_size=dw_kernel_size, res_post_norm=res_post_norm,
                             center_feature_scale=center_feature_scale, remove_center=remove_center)
            for i in range(depth)
        ])
        self.has_norm = not post_norm or center_feature_scale
        if self.has_norm:
            self.norm = build_norm_layer(channels, "LN")
        self.post_norm_block_ids = list(post_norm_block_ids) if post_norm_block_ids is not None else None
        if self.post_norm_block_ids is not None:
            self.post_norms = nn.ModuleList([build_norm_layer(channels, "LN", eps=1e-6)
                                             for _ in self.post_norm_block_ids])
        self.downsample = DownsampleLayer(channels=channels, norm_layer=norm_layer) if downsample else None

    def forward(self, x, return_wo_downsample=False):
        fused = self._fused_inference_forward(x)
        if fused is not None:
            x = fused
        else:
            for i, block in enumerate(self.blocks):
                x = block(x)
                if self.post_norm_block_ids is not None and i in self.post_norm_block_ids:
                    x = self.post_norms[self.post_norm_block_ids.index(i)](x)
            if self.has_norm:
                x = self.norm(x)
        features = x
        if self.downsample is not None:
            x = self.downsample(x)
        return (x, features) if return_wo_downsample else x

    def _fused_inference_forward(self, x):
        """The blocks and the stage's norm in inference, where every block takes its packed
        inference path (see InternImageBlock.forward) and is pre-norm: each block's last
        residual sum is made in one pass with the LayerNorm after it (the next block's first
        norm, after the last block the stage's), which saves a pass over the features and a
        call per block (InternImage-T: 30 sums, with 26 blocks' first norms and the 4 stages'
        norms). Returns the stage's normalised features, or None where this does not apply
        (training, autograd, hooks on a block or the stage's norm, level-2 post norms,
        post-norm blocks, a norm without affine parameters): the blocks are then called one by one."""
        if (self.training or torch.is_grad_enabled() or not self.has_norm or self.post_norm_block_ids is not None
                or x.requires_grad):
            return None
        norm = self.norm  # the blocks' own norms are checked with their structure
        if not (type(norm) is nn.Sequential and len(norm) == 1 and type(norm[0]) is nn.LayerNorm
                and not any(m.training or m._forward_hooks or m._forward_pre_hooks for m in (norm, norm[0]))):
            return None
        dtypes = []
        for block in self.blocks:
            dtype = block._inference_dtype(x)  # None also for hooks on the block itself
            if dtype is None or not block._pre_norm_fusable() or type(block).forward is not InternImageBlock.forward:
                return None
            dtypes.append(dtype)
        norms = [block.norm1[0] for block in self.blocks[1:]] + [norm[0]]  # LayerNorms: checked above
        if any(n.weight is None or n.bias is None for n in norms):
            return None
        normed = None
        for block, dtype, next_norm in zip(self.blocks, dtypes, norms):
            x, normed = block._inference_forward(x, dtype, normed, next_norm)
        return normed


def resolve_arch(arch: Union[str, dict, None], **explicit) -> dict:
    """The architecture settings of ``arch`` (a variant name or dict, default ``'t'``) with
    the explicitly given ones (those not ``None``) on top, every key of
    :data:`~internimage.models.variants.ARCH_KEYS` filled."""
    settings = dict(offset_scale=1.0, post_norm=False, res_post_norm=False, dw_kernel_size=None,
                    level2_post_norm=False, level2_post_norm_block_ids=None, center_feature_scale=False)
    settings.update(arch_settings("t" if arch is None else arch))
    missing = [k for k in ("channels", "depths", "groups") if k not in settings and explicit.get(k) is None]
    if missing:
        raise ValueError(f"an arch dict must give channels, depths and groups; missing {missing} in {arch!r}")
    given = {k: v for k, v in explicit.items() if v is not None}
    if isinstance(arch, dict):
        given = {**arch, **given}  # a dict arch states its settings as explicitly as keywords
    settings.update(given)
    if not settings["level2_post_norm"]:
        if given.get("level2_post_norm_block_ids") is not None:
            raise ValueError("level2_post_norm_block_ids is only used with level2_post_norm=True, got "
                             f"level2_post_norm_block_ids={given['level2_post_norm_block_ids']!r} and "
                             "level2_post_norm=False")
        settings["level2_post_norm_block_ids"] = None  # the arch's ids, switched off explicitly
    return settings


class InternImage(BaseModule):
    """InternImage backbone returning a list of NCHW feature maps (strides 4, 8, 16, 32).

    Args:
        arch: the architecture: a variant name ``'t'``, ``'s'``, ``'b'``, ``'l'``, ``'xl'``,
            ``'h'``, ``'g'`` (see :data:`internimage.models.variants.ARCH_SETTINGS`) or a dict
            of architecture settings. It fills ``channels``, ``depths``, ``groups``,
            ``offset_scale``, ``post_norm``, ``res_post_norm``, ``dw_kernel_size``,
            ``level2_post_norm(_block_ids)`` and ``center_feature_scale``; any of these given
            explicitly (not ``None``) overrides it. Default: ``'t'``.
        core_op: 'DCNv3' (compiled kernels) or 'DCNv3_pytorch' (pure-PyTorch reference).
        channels: channels C1 of the first stage; stage i has C1 * 2**i.
        depths, groups: blocks and DCNv3 groups per stage.
        mlp_ratio: hidden width of the MLPs relative to the channels.
        drop_rate: dropout in the MLPs and after the stem.
        drop_path_rate: stochastic depth rate, reached by the last block.
        drop_path_type: 'linear' (grows over the blocks) or 'uniform'.
        act_layer: 'GELU', 'ReLU' or 'SiLU'.
        norm_layer: 'LN' or 'BN' for the stem, downsampling and DCNv3 depthwise branch.
        layer_scale: initial value of the per-channel branch scales, or None for none.
        offset_scale: DCNv3 offset scale.
        post_norm: normalise branch outputs instead of inputs (S/B/L/XL/G).
        with_cp: gradient checkpointing per block (saves memory, costs a recompute).
        dw_kernel_size: depthwise kernel of the DCNv3 offset branch (5 for H/G; None: 3).
        level2_post_norm, level2_post_norm_block_ids: extra norms after these blocks of
            stage 3 (H/G); the ids are an error without ``level2_post_norm=True``.
        res_post_norm: normalise the pre-norm branch outputs again (H).
        center_feature_scale: learned blend of DCNv3 output and input projection (H/G).
        remove_center: DCNv3 without the kernel's centre point.
        out_indices: which stages' outputs to return.
        frozen_stages: -1 freezes nothing, 0 the stem, i >= 1 the stem and stages 1..i;
            frozen modules stay in eval mode and without gradients, also after ``train()``.
        init_cfg: mmengine init config; ``dict(type='Pretrained', checkpoint=PATH_OR_URL)``
            loads any official or converted checkpoint through
            :func:`internimage.checkpoint.load_backbone_weights`; with ``checkpoint=None``
            nothing is loaded (as with ``init_cfg=None``), so configs can leave the slot for
            ``--cfg-options model.backbone.init_cfg.checkpoint=PATH``.
        pretrained: shorthand for that init_cfg (as mmseg segmentors pass it).

    Example::

        InternImage(arch='l', drop_path_rate=0.4, layer_scale=1.0, with_cp=True)
    """

    def __init__(self, arch: Union[str, dict, None] = None, core_op: str = "DCNv3",
                 channels: Optional[int] = None, depths: Optional[Sequence[int]] = None,
                 groups: Optional[Sequence[int]] = None, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.2, drop_path_type: str = "linear", act_layer: str = "GELU",
                 norm_layer: str = "LN", layer_scale: Optional[float] = None, offset_scale: Optional[float] = None,
                 post_norm: Optional[bool] = None, with_cp: bool = False, dw_kernel_size: Optional[int] = None,
                 level2_post_norm: Optional[bool] = None, level2_post_norm_block_ids: Optional[Sequence[int]] = None,
                 res_post_norm: Optional[bool] = None, center_feature_scale: Optional[bool] = None,
                 remove_center: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 init_cfg: Optional[dict] = None, pretrained: Optional[str] = None):
        settings = resolve_arch(arch, channels=channels, depths=depths, groups=groups, offset_scale=offset_scale,
                                post_norm=post_norm, dw_kernel_size=dw_kernel_size,
                                level2_post_norm=level2_post_norm,
                                level2_post_norm_block_ids=level2_post_norm_block_ids, res_post_norm=res_post_norm,
                                center_feature_scale=center_feature_scale)
        assert set(settings) == set(ARCH_KEYS)
        channels, depths, groups = settings["channels"], settings["depths"], settings["groups"]
        offset_scale, post_norm, dw_kernel_size = (settings["offset_scale"], settings["post_norm"],
                                                   settings["dw_kernel_size"])
        level2_post_norm, level2_post_norm_block_ids = (settings["level2_post_norm"],
                                                        settings["level2_post_norm_block_ids"])
        res_post_norm, center_feature_scale = settings["res_post_norm"], settings["center_feature_scale"]
        if pretrained is not None:  # mmseg's EncoderDecoder(pretrained=...) passes it down
            if init_cfg is not None and not _is_empty_pretrained(init_cfg):
                raise ValueError("give the backbone either init_cfg or pretrained, not both")
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        if core_op not in CORE_OPS:
            raise ValueError(f"core_op must be one of {sorted(CORE_OPS)}, got {core_op!r}")
        if drop_path_type not in ("linear", "uniform"):
            raise ValueError(f"drop_path_type must be 'linear' or 'uniform', got {drop_path_type!r}")
        check_settings(channels=channels, depths=depths, groups=groups, mlp_ratio=mlp_ratio, drop_rate=drop_rate,
                       drop_path_rate=drop_path_rate, layer_scale=layer_scale, offset_scale=offset_scale,
                       dw_kernel_size=dw_kernel_size, level2_post_norm=level2_post_norm,
                       level2_post_norm_block_ids=level2_post_norm_block_ids, out_indices=out_indices,
                       frozen_stages=frozen_stages)
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = settings
        self.core_op = core_op
        self.num_levels = len(depths)
        self.depths = list(depths)
        self.channels = channels
        self.num_features = int(channels * 2 ** (self.num_levels - 1))
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.post_norm = post_norm

        self.patch_embed = StemLayer(3, channels, act_layer=act_layer, norm_layer=norm_layer)
        self.pos_drop = nn.Dropout(p=drop_rate)
        total = sum(depths)
        if drop_path_type == "uniform":
            dpr = [drop_path_rate] * total
        else:
            dpr = torch.linspace(0, drop_path_rate, total, device="cpu").tolist()
        self.levels = nn.ModuleList()
        for i in range(self.num_levels):
            self.levels.append(InternImageStage(
                core_op=CORE_OPS[core_op], channels=int(channels * 2 ** i), depth=depths[i], groups=groups[i],
                mlp_ratio=mlp_ratio, drop=drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                act_layer=act_layer, norm_layer=norm_layer, post_norm=post_norm,
                downsample=i < self.num_levels - 1, layer_scale=layer_scale, offset_scale=offset_scale,
                with_cp=with_cp, dw_kernel_size=dw_kernel_size,
                post_norm_block_ids=level2_post_norm_block_ids if level2_post_norm and i == 2 else None,
                res_post_norm=res_post_norm, center_feature_scale=center_feature_scale,
                remove_center=remove_center))
        self.apply(self._init_module)
        self._freeze_stages()

    @staticmethod
    def _init_module(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)
        if isinstance(m, ops_dcnv3.DCNv3):
            m._reset_parameters()

    def init_weights(self):
        """Load ``init_cfg=dict(type='Pretrained', checkpoint=...)`` through the project's
        converter (any official or converted format); other init configs go to mmengine."""
        if _is_empty_pretrained(self.init_cfg):
            # No checkpoint given: initialise exactly as with init_cfg=None (train from scratch).
            print_log("InternImage: init_cfg Pretrained without a checkpoint, so no weights to load: "
                      "training the backbone from scratch (set model.backbone.init_cfg.checkpoint=PATH "
                      "to start from a checkpoint)", logger="current")
            init_cfg, self.init_cfg = self.init_cfg, None
            try:
                super().init_weights()
            finally:
                self.init_cfg = init_cfg
            return
        if isinstance(self.init_cfg, dict) and self.init_cfg.get("type") == "Pretrained":
            from internimage.checkpoint import load_backbone_weights

            load_backbone_weights(self, self.init_cfg["checkpoint"],
                                  prefix=self.init_cfg.get("prefix"),
                                  map_location=self.init_cfg.get("map_location", "cpu"))
            self._is_init = True
            return
        super().init_weights()

    def _freeze_stages(self):
        if self.frozen_stages >= 0:
            frozen = [self.patch_embed] + list(self.levels[:self.frozen_stages])
            for module in frozen:
                module.eval()
                for param in module.parameters():
                    param.requires_grad = False

    def train(self, mode=True):
        super().train(mode)
        self._freeze_stages()
        if mode:  # the oneDNN weight copies of inference would only go stale while training
            release_packed_weights(self)
        return self

    def forward_stages(self, x, last: Optional[int] = None):
        """Stage outputs before downsampling, NHWC, for stages 0..``last`` (default: all)."""
        last = len(self.levels) - 1 if last is None else last
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for level in self.levels[:last + 1]:
            x, features = level(x, return_wo_downsample=True)
            outs.append(features)
        return outs

    def forward(self, x):
        """x: (N, 3, H, W) -> list of (N, C_i, H_i, W_i) for the stages in ``out_indices``."""
        stages = self.forward_stages(x, last=max(self.out_indices))
        return [out.permute(0, 3, 1, 2).contiguous() for i, out in enumerate(stages) if i in self.out_indices]
