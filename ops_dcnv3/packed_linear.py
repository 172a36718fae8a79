"""Inference-time linear layers on oneDNN with prepacked weights (CPU, float32).

``torch.nn.Linear`` on CPU calls MKL's GEMM after copying the bias into the output, and a
following GELU is one more pass over it. For inference, :func:`linear` runs the same
product through oneDNN with the weight reordered once into oneDNN's blocked layout (cached
on the module until the weight changes) and the GELU fused into the GEMM. On InternImage-T
this takes about 15% off a CPU forward pass; results agree with ``nn.Linear`` to float32
rounding.

It is used only where it is safe: no autograd (``torch.no_grad`` / ``inference_mode``), a
float32 CPU tensor, no autocast, no tracing or compiling, and no hooks on the layer (they
would be bypassed). Otherwise, and where PyTorch lacks the oneDNN ops, the layer runs as
usual. ``INTERNIMAGE_PACKED_LINEAR=0`` turns it off; :func:`release_packed_weights` frees
the cached copies (about the size of the model's linear weights).
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

_CACHE_ATTR = "_packed_weight"


def _ops_available() -> bool:
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


AVAILABLE = _ops_available()


def enabled() -> bool:
    return AVAILABLE and os.environ.get("INTERNIMAGE_PACKED_LINEAR", "1") != "0"


def _usable(layer: nn.Linear, x: torch.Tensor) -> bool:
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and layer.weight.dtype == torch.float32 and x.is_contiguous() and x.numel() > 0
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
            and not (layer._forward_hooks or layer._forward_pre_hooks) and enabled())


def _packed(layer: nn.Linear) -> torch.Tensor:
    weight = layer.weight
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    cached = getattr(layer, _CACHE_ATTR, None)
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        object.__setattr__(layer, _CACHE_ATTR, cached)  # not a parameter or buffer: no state_dict entry
    return cached[1]


def linear(layer: nn.Linear, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """``layer(x)``, or ``F.gelu(layer(x))`` with ``gelu=True`` (exact erf GELU)."""
    if _usable(layer, x):
        return torch.ops.mkldnn._linear_pointwise(x, _packed(layer), layer.bias, "gelu" if gelu else "none",
                                                  [], "none" if gelu else "")
    out = layer(x)
    return F.gelu(out) if gelu else out


def release_packed_weights(model: nn.Module) -> None:
    """Drop the cached oneDNN copies of the weights of ``model``'s linear layers."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and hasattr(module, _CACHE_ATTR):
            object.__delattr__(module, _CACHE_ATTR)
