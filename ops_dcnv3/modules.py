"""The DCNv3 module, with parameter names and shapes of the official implementation
so that official checkpoints load unchanged."""
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import constant_, xavier_uniform_

from .functions import dcnv3, dcnv3_reference
from .packed_linear import conv_sequential, linear_pair, packed_conv2d, packed_linear_pair

_DCNV3_FORWARD = torch.ops.ops_dcnv3.dcnv3_forward.default
_DW_CONV_LN_GELU = torch.ops.ops_dcnv3.dw_conv_ln_gelu.default

__all__ = ["DCNv3", "DCNv3_pytorch", "build_norm_layer", "build_act_layer", "to_channels_first", "to_channels_last"]


class to_channels_first(nn.Module):
    """(N, H, W, C) -> (N, C, H, W)."""

    def forward(self, x):
        return x.permute(0, 3, 1, 2)


class to_channels_last(nn.Module):
    """(N, C, H, W) -> (N, H, W, C)."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def build_norm_layer(dim, norm_layer, in_format="channels_last", out_format="channels_last", eps=1e-6):
    """BatchNorm ('BN') or LayerNorm ('LN') over ``dim`` channels, converting between layouts.

    Returns an ``nn.Sequential`` whose indices match the official implementation
    (e.g. ``dw_conv.1.1.weight`` for an LN behind a layout change).
    """
    layers = []
    if norm_layer == "BN":
        if in_format == "channels_last":
            layers.append(to_channels_first())
        layers.append(nn.BatchNorm2d(dim))
        if out_format == "channels_last":
            layers.append(to_channels_last())
    elif norm_layer == "LN":
        if in_format == "channels_first":
            layers.append(to_channels_last())
        layers.append(nn.LayerNorm(dim, eps=eps))
        if out_format == "channels_first":
            layers.append(to_channels_first())
    else:
        raise ValueError(f"norm_layer must be 'BN' or 'LN', got {norm_layer!r}")
    return nn.Sequential(*layers)


def build_act_layer(act_layer):
    """'ReLU', 'SiLU' or 'GELU' as a module."""
    layers = {"ReLU": lambda: nn.ReLU(inplace=True), "SiLU": lambda: nn.SiLU(inplace=True), "GELU": nn.GELU}
    if act_layer not in layers:
        raise ValueError(f"act_layer must be one of {sorted(layers)}, got {act_layer!r}")
    return layers[act_layer]()


class DCNv3(nn.Module):
    """DCNv3 block operator: projections, depthwise-conv offset/mask branch, deformable sampling.

    Input and output are channels-last ``(N, H, W, C)``.

    Args:
        channels: number of channels C.
        kernel_size: sampling kernel size (square).
        dw_kernel_size: kernel of the depthwise conv that predicts offsets and masks
            (default: ``kernel_size``).
        stride, pad, dilation: of the sampling kernel.
        group: number of groups; ``channels`` must be divisible by it.
        offset_scale: scale of the sampling grid and the learned offsets.
        act_layer, norm_layer: of the depthwise branch ('GELU'/'ReLU'/'SiLU', 'LN'/'BN').
        center_feature_scale: blend the output with the input projection by a learned
            per-group gate.
        remove_center: drop the kernel's centre point (odd kernels of 3 or more only).
    """

    core_op = staticmethod(dcnv3)

    def __init__(self, channels=64, kernel_size=3, dw_kernel_size=None, stride=1, pad=1, dilation=1, group=4,
                 offset_scale=1.0, act_layer="GELU", norm_layer="LN", center_feature_scale=False,
                 remove_center=False):
        super().__init__()
        if channels % group != 0:
            raise ValueError(f"channels must be divisible by group, but got {channels} and {group}")
        if remove_center and (kernel_size % 2 == 0 or kernel_size < 3):
            # kernel_size=1 would leave no sampling point at all.
            raise ValueError(f"remove_center needs an odd kernel_size of at least 3, got {kernel_size}")
        group_channels = channels // group
        if group_channels & (group_channels - 1) != 0:
            warnings.warn("DCNv3 runs fastest when channels per group is a power of 2; got "
                          f"{group_channels}", stacklevel=2)
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.offset_scale = offset_scale
        self.channels = channels
        self.kernel_size = kernel_size
        self.dw_kernel_size = dw_kernel_size
        self.stride = stride
        self.dilation = dilation
        self.pad = pad
        self.group = group
        self.group_channels = group_channels
        self.center_feature_scale = center_feature_scale
        self.remove_center = bool(remove_center)
        points = kernel_size * kernel_size - int(self.remove_center)

        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=dw_kernel_size, stride=1, padding=(dw_kernel_size - 1) // 2,
                      groups=channels),
            build_norm_layer(channels, norm_layer, "channels_first", "channels_last"),
            build_act_layer(act_layer),
        )
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))
        self._reset_parameters()

    def _reset_parameters(self):
        # Zero offsets and uniform masks at start: the op begins as a plain (averaging) conv.
        constant_(self.offset.weight, 0.0)
        constant_(self.offset.bias, 0.0)
        constant_(self.mask.weight, 0.0)
        constant_(self.mask.bias, 0.0)
        xavier_uniform_(self.input_proj.weight)
        constant_(self.input_proj.bias, 0.0)
        xavier_uniform_(self.output_proj.weight)
        constant_(self.output_proj.bias, 0.0)

    def forward(self, input):
        """input: (N, H, W, C) -> (N, Ho, Wo, C)."""
        x_proj = self.input_proj(input)  # nn.Linear (MKL): see inference_forward
        features = conv_sequential(self.dw_conv, input.permute(0, 3, 1, 2))  # channels-last out
        # One matrix product for both on the packed inference path (the op reads the slices);
        # softmax over the points of each group: inside the op.
        offset, mask_logits = linear_pair(self.offset, self.mask, features)
        x = self.core_op(x_proj, offset, mask_logits, self.kernel_size, self.kernel_size, self.stride, self.stride,
                         self.pad, self.pad, self.dilation, self.dilation, self.group, self.group_channels,
                         self.offset_scale, self.remove_center, softmax=True)
        return self.output_proj(self._blend(x, x_proj, features))

    def _blend(self, x, x_proj, features):
        if not self.center_feature_scale:
            return x
        scale = F.linear(features, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias).sigmoid()
        scale = scale.repeat_interleave(self.group_channels, dim=-1)  # (N, H, W, G) -> (N, H, W, C)
        return x * (1 - scale) + x_proj * scale

    def inference_ready(self) -> bool:
        """Whether :meth:`inference_forward` covers this module: the compiled core op, and a
        depthwise branch of convolution, LayerNorm and GELU (the defaults)."""
        dw = self.dw_conv
        return (self.core_op is dcnv3 and type(dw) is nn.Sequential and len(dw) == 3 and type(dw[0]) is nn.Conv2d
                and type(dw[1]) is nn.Sequential and len(dw[1]) == 2 and type(dw[1][0]) is to_channels_last
                and type(dw[1][1]) is nn.LayerNorm and type(dw[2]) is nn.GELU)

    @staticmethod
    def _dw_fusable(conv, norm, act) -> bool:
        """Whether the fused kernel ``dw_conv_ln_gelu`` computes the depthwise branch: a
        depthwise convolution of odd square kernel that keeps the size, an affine LayerNorm
        over the channels and the exact GELU (what the constructor builds for an odd
        ``dw_kernel_size``)."""
        k = conv.kernel_size[0]
        return (k % 2 == 1 and conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2)
                and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
                and conv.groups == conv.in_channels == conv.out_channels
                and norm.normalized_shape == (conv.out_channels,) and norm.weight is not None
                and norm.bias is not None and act.approximate == "none")

    def inference_forward(self, input, dtype):
        """:meth:`forward` on the packed inference path, for a caller that has checked that it
        applies (``packed_linear.inference_dtype`` and :meth:`inference_ready`): the same
        operations, without module calls or per-layer checks (at batch size 1 those made up
        a tenth of InternImage-T's time on a 2-core CPU). The square input and output
        projections stay on MKL (``F.linear``, as in :meth:`forward`): at batch 1 oneDNN's
        per-call cost outweighed its faster kernel there (3% of the model's time), at batch 8
        the two were even."""
        x_proj = F.linear(input, self.input_proj.weight, self.input_proj.bias)
        conv, (_, norm), act = self.dw_conv
        if self._dw_fusable(conv, norm, act):
            # One compiled pass instead of three calls (cpu/block_inference_cpu.cpp): their fixed costs
            # were most of the branch's time at batch 1.
            features = _DW_CONV_LN_GELU(input, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps)
        else:
            features = packed_conv2d(conv, input.permute(0, 3, 1, 2), dtype).permute(0, 2, 3, 1)
            features = torch.ops.aten.gelu_(  # in place: the norm's own output
                F.layer_norm(features, norm.normalized_shape, norm.weight, norm.bias, norm.eps),
                approximate=act.approximate)
        offset, mask_logits = packed_linear_pair(self.offset, self.mask, features, dtype)
        x = _DCNV3_FORWARD(x_proj, offset, mask_logits, self.kernel_size, self.kernel_size, self.stride, self.stride,
                           self.pad, self.pad, self.dilation, self.dilation, self.group, self.group_channels,
                           float(self.offset_scale), self.remove_center, True)
        return F.linear(self._blend(x, x_proj, features), self.output_proj.weight, self.output_proj.bias)


class DCNv3_pytorch(DCNv3):
    """:class:`DCNv3` on the pure-PyTorch reference core (``dcnv3_reference``)."""

    core_op = staticmethod(dcnv3_reference)
