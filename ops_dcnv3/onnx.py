"""ONNX translations of ``ops_dcnv3::dcnv3_forward`` for ``torch.onnx.export(dynamo=True)``.

The compiled operator is opaque to ONNX, so a graph that holds it runs nowhere without a
plugin. :func:`dcnv3_onnx` writes the same computation in standard ONNX operators, the way
the pure-PyTorch reference does (see :func:`ops_dcnv3.dcnv3_reference`): ``GridSample``
(bilinear, ``padding_mode='zeros'``, ``align_corners=0``) samples each group's channels at
the sampling locations, and the mask weights them (``Mul`` + ``ReduceSum``). The regular
part of the sampling locations (pixel centres and kernel grid, already in
``GridSample``'s normalised coordinates) is a constant folded at export time, so the graph
adds just one ``Mul`` + ``Add`` to the learned offsets::

    grid = offset * (2 * offset_scale / [W, H]) + (2 * (centre + kernel_grid * offset_scale) + 1) / [W, H] - 1

``GridSample`` with ``align_corners=0`` puts pixel ``k`` at ``(2k + 1) / size - 1`` and
reads zeros outside the image, which is exactly the operator's bilinear interpolation
with zero corners (SPEC section 3). Height and width must be static (the constant depends
on them); the batch may be dynamic.

:func:`dcnv3_onnx_custom` instead emits one node ``ops_dcnv3.DCNv3`` (domain
:data:`CUSTOM_DOMAIN`) with the operator's arguments as attributes, for runtimes that have
a plugin for it (TensorRT and the like); stock onnxruntime cannot run it.

Use::

    import torch
    from ops_dcnv3.onnx import translation_table

    torch.onnx.export(model, (x,), "model.onnx", dynamo=True,
                      custom_translation_table=translation_table())
"""
from typing import Callable, Dict

import numpy as np
import torch

try:
    import onnx
    import onnxscript
    from onnxscript import opset18 as op
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError(f"ONNX export needs the deploy extras ({error}); install them with "
                      "`pip install onnx onnxruntime onnxscript` (or `pip install -r requirements.txt`)") from error

from .functions import dcnv3_output_size

__all__ = ["CUSTOM_DOMAIN", "dcnv3_onnx", "dcnv3_onnx_custom", "translation_table", "sampling_grid_constants"]

CUSTOM_DOMAIN = "ops_dcnv3"


def _custom_op_schema() -> "onnx.defs.OpSchema":
    """Schema of the plugin node ``ops_dcnv3.DCNv3`` (version 1): what a runtime plugin implements."""
    OpSchema = onnx.defs.OpSchema
    ints = ["kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w", "group",
            "group_channels", "remove_center", "softmax"]
    attributes = [OpSchema.Attribute(name, OpSchema.AttrType.INT, "as in ops_dcnv3.dcnv3") for name in ints]
    attributes.append(OpSchema.Attribute("offset_scale", OpSchema.AttrType.FLOAT, "as in ops_dcnv3.dcnv3"))
    return OpSchema(
        "DCNv3", CUSTOM_DOMAIN, 1,
        doc="DCNv3 core (ops_dcnv3::dcnv3_forward): channels-last input (N, H, W, C), offset "
            "(N, Ho, Wo, group*P*2), mask (N, Ho, Wo, group*P) -> (N, Ho, Wo, C); see SPEC section 3.",
        inputs=[OpSchema.FormalParameter(name, "T") for name in ("input", "offset", "mask")],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"],
                           "floating-point tensors")],
        attributes=attributes)


_custom_op = onnxscript.values.Op(onnxscript.values.Opset(CUSTOM_DOMAIN, 1), "DCNv3", _custom_op_schema())


def sampling_grid_constants(height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                            dilation_h, dilation_w, offset_scale, remove_center):
    """The offset-independent part of the sampling locations in ``GridSample`` coordinates.

    Returns ``(base, scale)``: ``base`` of shape ``(Ho, Wo, 1, P, 2)`` (x, y in [-1, 1] at
    the image border, ``align_corners=False``) and ``scale`` of shape ``(2,)`` such that the
    grid of ``GridSample`` is ``offset * scale + base`` for offsets laid out
    ``(N, Ho, Wo, group, P, 2)``. Computed in float64 (the result is float32-exact to the
    last bit in practice, better than building it at run time in float32).
    """
    ho, wo = dcnv3_output_size(height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                               dilation_h, dilation_w)
    half_w = dilation_w * (kernel_w - 1) // 2
    half_h = dilation_h * (kernel_h - 1) // 2
    # Kernel points enumerated x-major (p = i*kh + j), as the operator does.
    i, j = np.meshgrid(np.arange(kernel_w), np.arange(kernel_h), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    keep = ~((i == kernel_w // 2) & (j == kernel_h // 2)) if remove_center else np.ones(i.shape, bool)
    grid_x = (i * dilation_w - half_w)[keep].astype(np.float64)
    grid_y = (j * dilation_h - half_h)[keep].astype(np.float64)
    centres_x = np.arange(wo, dtype=np.float64) * stride_w - pad_w + half_w
    centres_y = np.arange(ho, dtype=np.float64) * stride_h - pad_h + half_h
    x = np.broadcast_to(centres_x[None, :, None] + grid_x * offset_scale, (ho, wo, grid_x.size))
    y = np.broadcast_to(centres_y[:, None, None] + grid_y * offset_scale, (ho, wo, grid_x.size))
    base = np.stack([(2 * x + 1) / width - 1, (2 * y + 1) / height - 1], axis=-1)[:, :, None]
    scale = np.array([2 * offset_scale / width, 2 * offset_scale / height])
    return base, scale


def _constant(array: np.ndarray, like):
    """A float constant in the dtype of ``like`` (float16 / bfloat16 models keep their dtype)."""
    return op.CastLike(op.Constant(value=onnx.numpy_helper.from_array(np.ascontiguousarray(array, np.float32))),
                       like)


def _shape(*dims: int):
    return op.Constant(value=onnx.numpy_helper.from_array(np.array(dims, dtype=np.int64)))


def _static_size(input, name: str):
    """Height and width of the (N, H, W, C) input; the sampling-grid constant needs them fixed."""
    dims = [input.shape[k] for k in (1, 2, 3)]
    if not all(isinstance(d, int) for d in dims):
        raise ValueError(f"{name}: the ONNX translation of DCNv3 needs a static height, width and channel "
                         f"count, got (N, H, W, C) = {input.shape}; export with a fixed input shape "
                         "(only the batch may be dynamic)")
    return dims


def dcnv3_onnx(input, offset, mask, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int,
               pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
               remove_center: bool, softmax: bool = False):
    """``ops_dcnv3::dcnv3_forward`` in standard ONNX operators (opset 18 nodes; the exporter
    converts them to the requested opset). Same arguments as the op; see the module docstring."""
    height, width, channels = _static_size(input, "dcnv3_forward")
    ho, wo = dcnv3_output_size(height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                               dilation_h, dilation_w)
    points = kernel_h * kernel_w - int(remove_center)
    base, scale = sampling_grid_constants(height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                          dilation_h, dilation_w, offset_scale, remove_center)
    # Sampling grid (N*G, Ho*Wo, P, 2); the leading 0 / -1 keep the batch dynamic.
    grid = op.Reshape(offset, _shape(0, ho, wo, group, points, 2))
    grid = op.Add(op.Mul(grid, _constant(scale, input)), _constant(base, input))
    grid = op.Reshape(op.Transpose(grid, perm=[0, 3, 1, 2, 4, 5]), _shape(-1, ho * wo, points, 2))
    # Each group's channels as one GridSample image: (N, H, W, G*Cg) -> (N*G, Cg, H, W).
    image = op.Transpose(op.Reshape(input, _shape(0, height, width, group, group_channels)), perm=[0, 3, 4, 1, 2])
    image = op.Reshape(image, _shape(-1, group_channels, height, width))
    sampled = op.GridSample(image, grid, align_corners=0, mode="bilinear", padding_mode="zeros")  # (N*G, Cg, Ho*Wo, P)
    weights = op.Reshape(mask, _shape(0, ho * wo, group, points))
    if softmax:
        weights = op.Softmax(weights, axis=-1)
    weights = op.Reshape(op.Transpose(weights, perm=[0, 2, 1, 3]), _shape(-1, 1, ho * wo, points))
    output = op.ReduceSum(op.Mul(sampled, weights), _shape(-1), keepdims=0)  # (N*G, Cg, Ho*Wo)
    output = op.Reshape(output, _shape(-1, channels, ho, wo))
    return op.Transpose(output, perm=[0, 2, 3, 1])


def dcnv3_onnx_custom(input, offset, mask, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int,
                      pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
                      offset_scale: float, remove_center: bool, softmax: bool = False):
    """``ops_dcnv3::dcnv3_forward`` as one ``ops_dcnv3.DCNv3`` node, for runtimes with a plugin.

    Inputs and output are channels-last as in the op; the attributes are the op's arguments
    (booleans as 0/1 integers)."""
    return _custom_op(
        input, offset, mask, kernel_h=kernel_h, kernel_w=kernel_w, stride_h=stride_h, stride_w=stride_w,
        pad_h=pad_h, pad_w=pad_w, dilation_h=dilation_h, dilation_w=dilation_w, group=group,
        group_channels=group_channels, offset_scale=float(offset_scale), remove_center=int(bool(remove_center)),
        softmax=int(bool(softmax)))


def translation_table(custom_op: bool = False) -> Dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: standard operators
    (:func:`dcnv3_onnx`), or with ``custom_op=True`` the plugin node (:func:`dcnv3_onnx_custom`)."""
    return {torch.ops.ops_dcnv3.dcnv3_forward.default: dcnv3_onnx_custom if custom_op else dcnv3_onnx}
