"""Inference-time linear layers and convolutions on oneDNN with prepacked weights (CPU,
float32; linear layers also bfloat16).

``torch.nn.Linear`` on CPU calls MKL's GEMM after copying the bias into the output, and a
following GELU is one more pass over it. For inference, :func:`linear` runs the same
product through oneDNN with the weight reordered once into oneDNN's blocked layout (cached
on the module until the weight changes) and a following GELU applied in place (fused into
the GEMM in bfloat16). On InternImage-T this takes about 15% off a CPU forward pass; results
agree with ``nn.Linear`` to float32 rounding.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (or with bfloat16 inputs and
weights), on CPUs where oneDNN has native bfloat16 kernels (AVX512-BF16, AMX, AVX-NE-CONVERT;
``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), the layer runs in bfloat16 on a cached
bfloat16 copy of the weight in oneDNN's layout (AMX tiles where present). Autocast itself
would cast the float32 weight to bfloat16 and oneDNN would reorder it at every call. Inputs
are cast to bfloat16 as autocast casts them, the output is bfloat16 as autocast's, and
products accumulate in float32 in both: results equal autocast's up to summation order.
On other CPUs autocast runs as usual (there bfloat16 matrix products are emulated and
slower than float32).

:func:`conv2d` does the same for a float32 ``nn.Conv2d``: PyTorch reorders a convolution's
weight into oneDNN's layout at every call (for a channels-last input after copying it to
channels-last), which made InternImage-T's last downsampling convolution cost 6 ms at batch 1
instead of 1 ms; the packed convolution runs in channels-last memory.

A model block can skip its layers' per-call checks and module calls: the packed products
(:func:`packed_linear`, :func:`packed_linear_pair`, :func:`packed_conv2d`) take a dtype that
the caller has checked once with :func:`inference_dtype` (InternImageBlock does this).

It is used only where it is safe: no autograd (``torch.no_grad`` / ``inference_mode``), a
CPU tensor, no tracing or compiling, and no hooks on the layer (they would be bypassed).
Otherwise, and where PyTorch lacks the oneDNN ops, the layer runs as usual.
``INTERNIMAGE_PACKED_LINEAR=0`` turns it off (linear layers and convolutions);
:func:`release_packed_weights` frees the cached copies (about the size of the model's
weights per dtype).
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_py

_CACHE_ATTR = "_packed_weight"


def _ops_available(*names) -> bool:
    try:
        return torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, name) for name in names)
    except (AttributeError, RuntimeError):
        return False


def _bf16_available() -> bool:
    try:
        return AVAILABLE and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


AVAILABLE = _ops_available("_linear_pointwise", "_reorder_linear_weight")
CONV_AVAILABLE = _ops_available("_convolution_pointwise", "_reorder_convolution_weight")
BF16_AVAILABLE = _bf16_available()  # native bfloat16 oneDNN kernels on this CPU


def enabled() -> bool:
    return AVAILABLE and os.environ.get("INTERNIMAGE_PACKED_LINEAR", "1") != "0"


def _eager_cpu_inference(x: torch.Tensor) -> bool:
    """The conditions of every packed path: packing on, no autograd, a non-empty CPU tensor,
    no tracing or compiling."""
    return not (torch.is_grad_enabled() or x.device.type != "cpu" or x.numel() == 0 or not enabled()
                or torch.jit.is_tracing() or torch.compiler.is_compiling())


def _compute_dtype(layer: nn.Module, x: torch.Tensor, contiguous: bool = True) -> Optional[torch.dtype]:
    """The dtype the packed path computes ``layer(x)`` in, or None where it does not apply."""
    if (not _eager_cpu_inference(x) or (contiguous and not x.is_contiguous())
            or layer._forward_hooks or layer._forward_pre_hooks or layer.weight.is_inference()):
        # A weight made under torch.inference_mode has no version counter, so its packed copy
        # cannot be cached (see _cached); packing it at every call cost more than the plain
        # layer saves (InternImage-T built under inference_mode ran 1.3x slower).
        return None
    if torch.is_autocast_enabled("cpu"):
        # autocast would compute in bfloat16: packed bfloat16 where oneDNN has native kernels
        # for it, else autocast's own path.
        floats = (torch.float32, torch.bfloat16)
        if (torch.get_autocast_dtype("cpu") == torch.bfloat16 and BF16_AVAILABLE
                and x.dtype in floats and layer.weight.dtype in floats):
            return torch.bfloat16
        return None
    if x.dtype == layer.weight.dtype and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and BF16_AVAILABLE)):
        return x.dtype
    return None


def _reorder_weight(weight):
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def _linear_pointwise(*args):
    return _LINEAR_OP(*args)


_LINEAR_OP = torch.ops.mkldnn._linear_pointwise.default if AVAILABLE else None
_CONV_OP = torch.ops.mkldnn._convolution_pointwise.default if CONV_AVAILABLE else None


def _usable(layer: nn.Linear, x: torch.Tensor) -> bool:
    return _compute_dtype(layer, x) is not None


def _cached(owner: nn.Module, slot, tensors, build, extra=None):
    """``build()``, cached on ``owner`` under ``slot`` until one of ``tensors`` (the parameters it
    is made from) changes: other storage, an in-place update or another shape, or ``extra``
    (anything else the result depends on) changes. Parameters
    created under ``torch.inference_mode`` have no version counter to tell an in-place update
    (``load_state_dict`` there copies into them): built at every call, never cached (the
    callers keep such layers off the packed path, see :func:`_compute_dtype`; this is the
    safety net)."""
    try:
        key = [None if t is None else (t.data_ptr(), t._version, t.shape) for t in tensors] + [extra]
    except RuntimeError:  # "Inference tensors do not track version counter"
        return build()
    caches = owner.__dict__.get(_CACHE_ATTR)
    if caches is None:
        caches = {}
        object.__setattr__(owner, _CACHE_ATTR, caches)  # not a parameter or buffer: no state_dict entry
    cached = caches.get(slot)
    if cached is None or cached[0] != key:
        cached = caches[slot] = (key, build())
    return cached[1]


def _packed(layer: nn.Module, dtype: torch.dtype, input_size=None):
    """(weight in oneDNN's layout, bias) in ``dtype``, cached per dtype until the parameters
    change. A convolution passes its ``input_size``: oneDNN lays its weight out for one input
    shape, so the pack is keyed on the shape too."""
    weight, bias = layer.weight, layer.bias

    def build():
        data = weight.detach().to(dtype)
        packed = _reorder_weight(data) if input_size is None else _reorder_conv_weight(
            data, list(layer.padding), list(layer.stride), list(layer.dilation), layer.groups, list(input_size))
        return packed, None if bias is None else bias.detach().to(dtype)

    return _cached(layer, dtype, (weight, bias), build, input_size)


def _packed_pair(first: nn.Linear, second: nn.Linear, dtype: torch.dtype):
    """(stacked weights in oneDNN's layout, stacked biases) of two linear layers, cached on ``first``."""
    def build():
        weight = torch.cat([first.weight.detach(), second.weight.detach()]).to(dtype)
        biases = [layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features)
                  for layer in (first, second)]
        return _reorder_weight(weight), torch.cat(biases).to(dtype)

    return _cached(first, ("pair", dtype), (first.weight, first.bias, second.weight, second.bias), build)


# The packed products themselves, for callers that have checked that the packed path
# applies and converted ``x`` to ``dtype`` (linear() and co. below, and the inference
# paths of the model's blocks, which check once per block).

def packed_linear(layer: nn.Linear, x: torch.Tensor, dtype: torch.dtype, gelu: bool = False) -> torch.Tensor:
    weight, bias = _packed(layer, dtype)
    if gelu and dtype == torch.float32:
        # float32: PyTorch's GELU in place on the product. oneDNN's fused erf GELU made the
        # product slower than the two passes (InternImage-T's fc1 at every stage, batch 1 and 8,
        # AVX2: 9.0 -> 6.9 ms at 7x7x512, 1.13 -> 0.89 ms at 14x14x256, batch 1); same values
        # as F.gelu(layer(x)) up to the product's rounding.
        return torch.ops.aten.gelu_(_linear_pointwise(x, weight, bias, "none", [], ""))
    return _linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


def packed_linear_pair(first: nn.Linear, second: nn.Linear, x: torch.Tensor, dtype: torch.dtype):
    weight, bias = _packed_pair(first, second, dtype)
    out = _linear_pointwise(x, weight, bias, "none", [], "")
    return out[..., :first.out_features], out[..., first.out_features:]


def _reorder_conv_weight(weight, padding, stride, dilation, groups, input_size):
    return torch.ops.mkldnn._reorder_convolution_weight(weight, padding, stride, dilation, groups, input_size)


def packed_conv2d(layer: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # oneDNN picks the weight's layout for the input's shape: a weight packed for another
    # shape was reordered again inside every call (InternImage-T at 224x224 after one call at
    # 64x64: 207 instead of 141 ms). So the pack is keyed on the input's shape too, one per
    # layer: a new shape packs once more (what every call of the plain layer costs).
    weight, bias = _packed(layer, dtype, tuple(x.shape))
    x = x.contiguous(memory_format=torch.channels_last)
    return _CONV_OP(x, weight, bias, layer.padding, layer.stride, layer.dilation, layer.groups, "none", [], "")


def linear(layer: nn.Linear, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """``layer(x)``, or ``F.gelu(layer(x))`` with ``gelu=True`` (exact erf GELU)."""
    dtype = _compute_dtype(layer, x)
    if dtype is not None:
        return packed_linear(layer, x.to(dtype), dtype, gelu)
    out = layer(x)
    return F.gelu(out) if gelu else out


def linear_pair(first: nn.Linear, second: nn.Linear, x: torch.Tensor):
    """``(first(x), second(x))`` for two layers with the same input, as one matrix product on
    the packed path (their weights stacked, cached on ``first``): the results are channel
    slices of one tensor, which the DCNv3 CPU kernels read in place. Elsewhere two calls."""
    dtype = _compute_dtype(first, x)
    if dtype is None or _compute_dtype(second, x) != dtype:
        return linear(first, x), linear(second, x)
    return packed_linear_pair(first, second, x.to(dtype), dtype)


def _conv_packable(layer: nn.Conv2d, x: torch.Tensor) -> bool:
    return (CONV_AVAILABLE and type(layer) is nn.Conv2d and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str) and x.dim() == 4)


def conv2d(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for an NCHW tensor ``x``. On the packed path (see the top of this module)
    a oneDNN convolution in channels-last memory with the weight reordered once per input shape
    and cached:
    an input in another layout is copied to channels-last first (that copy costs less than the
    convolution gains: the stem's 3-channel convolution on an NCHW batch of 8 took 9x longer),
    and the output is channels-last, an NCHW tensor as ``layer``'s. Without the cache, PyTorch
    reorders the weight at every call (and, for a channels-last input, copies it first)."""
    # float32 only: the bfloat16 convolutions (autocast) are left to autocast, untested here
    # on a CPU with native bfloat16.
    if _compute_dtype(layer, x, contiguous=False) != torch.float32 or not _conv_packable(layer, x):
        return layer(x)
    return packed_conv2d(layer, x, torch.float32)


def _global_hooks() -> bool:
    """Hooks registered for every module (torch.nn.modules.module.register_module_forward_hook
    and co.), which a module's own __call__ would run."""
    return any(getattr(_module_py, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def inference_dtype(modules, weights, x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype in which a model block made of ``modules`` (all its submodules, itself
    included) may run its inference path, which calls the packed products directly instead of
    its layers: float32, the dtype of ``x`` and of ``weights`` (those of the layers the path
    uses), without autograd, autocast, tracing or compiling, with ``x`` a contiguous CPU
    tensor, and with every module in eval mode and without hooks (the path would bypass
    them). None where it does not apply."""
    if (not _eager_cpu_inference(x) or torch.is_autocast_enabled("cpu") or not x.is_contiguous()
            or not CONV_AVAILABLE or _global_hooks()):
        return None
    dtype = x.dtype
    if dtype != torch.float32:  # bfloat16 models take the layers' own packed paths
        return None
    for m in modules:
        if m.training or m._forward_hooks or m._forward_pre_hooks:
            return None
    for weight in weights:
        if weight.dtype != dtype or weight.is_inference():  # inference tensors: see _compute_dtype
            return None
    return dtype


def conv_sequential(sequential: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``sequential(x)`` for a Sequential that starts with a Conv2d, the convolution through
    :func:`conv2d` (unless the Sequential has hooks, which that would bypass)."""
    if sequential._forward_hooks or sequential._forward_pre_hooks or not isinstance(sequential[0], nn.Conv2d):
        return sequential(x)
    x = conv2d(sequential[0], x)
    for layer in sequential[1:]:
        x = layer(x)
    return x


def release_packed_weights(model: nn.Module) -> None:
    """Drop the cached oneDNN copies of the weights of ``model``'s linear and conv layers."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.__dict__.pop(_CACHE_ATTR, None)
