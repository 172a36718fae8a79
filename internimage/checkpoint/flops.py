"""Parameter and FLOP counts with mmengine's analysis tools (jit-traced, fvcore rules).

"FLOPs" are multiply-accumulates, counted the way the published InternImage figures
were: the usual per-operator counts of convolutions, linear layers, matmuls and norms,
and for each DCNv3 core (output H x W, C channels, P sampling points) the count of its
official pure-PyTorch form, ``grid_sample`` at 4 MACs per sampled value (4*H*W*P*C),
plus the paper's ``5*H*W*P*C`` for the core. This reproduces the published numbers
(T 5.00G, S 8.46G, B 16.40G at 224; L 108.85G, XL 164.24G at 384).
"""
import numbers
from typing import Sequence, Tuple

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape

import ops_dcnv3  # noqa: F401  (registers the op that the handle below counts)

DCNV3_OP = "ops_dcnv3::dcnv3_forward"
# Position of `group` in the op's schema (ops_dcnv3/csrc/dcnv3.cpp): input, offset, mask, kernel_h,
# kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, ...
GROUP_ARG = 11


def dcnv3_flop_jit(inputs, outputs) -> int:
    """FLOP handle for the traced DCNv3 core op: (4 + 5) * N * Ho * Wo * P * C."""
    n, ho, wo, channels = get_shape(outputs[0])
    group_points = get_shape(inputs[2])[-1]  # mask: (N, Ho, Wo, group * P)
    group = inputs[GROUP_ARG].toIValue()
    sampled_values = n * ho * wo * (group_points // group) * channels
    return (4 + 5) * sampled_values


# The backbone downsamples by 32 (stem 4x, then three 2x downsamplings): smaller inputs
# leave the last stages without a pixel of their own.
MIN_SIZE = 32


def check_input_shape(height, width, name: str = "height and width") -> None:
    """``height`` and ``width`` must be integers >= 32; a ValueError naming ``name`` otherwise."""
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < MIN_SIZE:
            raise ValueError(f"{name} must be integers >= {MIN_SIZE} (the backbone downsamples by 32), "
                             f"got {height!r} x {width!r}")


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Total MACs of ``model(*inputs)`` (eval mode, no grad)."""
    model.eval()
    with torch.no_grad():
        analyzer = FlopAnalyzer(model, tuple(inputs))
        analyzer.set_op_handle(DCNV3_OP, dcnv3_flop_jit)
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        return int(analyzer.total())


def classifier_complexity(name: str, height: int, width: int) -> Tuple[int, int]:
    """(params, MACs) of a variant's 1000-class classifier at ``height x width``."""
    from ..models.builder import build_model

    check_input_shape(height, width)
    model = build_model(name, num_classes=1000)
    return count_params(model), count_flops(model, (torch.zeros(1, 3, height, width),))


class _TensorForward(torch.nn.Module):
    """Wraps a detector or segmentor so that tracing sees ``forward(image) -> tensors``."""

    def __init__(self, model, height, width):
        super().__init__()
        self.model = model
        self.height, self.width = height, width

    def forward(self, image):
        data_samples = None
        if hasattr(self.model, "roi_head") or hasattr(self.model, "rpn_head"):
            from mmdet.structures import DetDataSample

            shape = (self.height, self.width)
            sample = DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape,
                                                 scale_factor=(1.0, 1.0), batch_input_shape=shape))
            data_samples = [sample]
        return self.model._forward(image, data_samples)


def config_complexity(cfg, height: int, width: int) -> Tuple[int, int]:
    """(params, MACs) of the model of an mmdet/mmseg config on one ``height x width`` image."""
    from mmengine.registry import MODELS, init_default_scope

    import internimage  # noqa: F401  (registers InternImage)

    check_input_shape(height, width)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    model = MODELS.build(cfg.model)
    if hasattr(model, "backbone") and hasattr(model.backbone, "with_cp"):
        model.backbone.with_cp = False
    return count_params(model), count_flops(_TensorForward(model, height, width),
                                            (torch.zeros(1, 3, height, width),))
