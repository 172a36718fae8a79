"""Functional interface of the DCNv3 operator.

``dcnv3`` calls the compiled kernels (``torch.ops.ops_dcnv3.dcnv3_forward`` /
``dcnv3_backward``, registered in C++); its autograd formula and fake (meta)
kernels are registered here with ``torch.library`` so that autograd,
``torch.compile`` and export all see the op. ``dcnv3_reference`` is the pure
PyTorch numerical reference, written from the operator's definition.

Semantics (tensors channels-last, ``P = kernel_h * kernel_w - remove_center``):
input ``(N, H, W, group*group_channels)``, offset ``(N, Ho, Wo, group*P*2)``
laid out ``[g][p][(dx, dy)]``, mask ``(N, Ho, Wo, group*P)`` (used as given:
the module applies the softmax), output ``(N, Ho, Wo, C)``. Point ``p = i*kh + j``
(``i`` along x) of output pixel ``(ho, wo)`` samples, by bilinear interpolation
with zeros outside the image, the location::

    x = wo*stride_w - pad_w + half_w + (i*dilation_w - half_w + dx) * offset_scale
    y = ho*stride_h - pad_h + half_h + (j*dilation_h - half_h + dy) * offset_scale

with ``half_w = dilation_w*(kernel_w-1)//2``. A location outside the open box
``(-1, W) x (-1, H)`` contributes zero and gets zero gradient. A location that is
not finite (NaN or +-Inf in x or y, as diverged offset weights give) makes the output
of its pixel and group NaN and gets NaN offset and mask gradients, as ``grid_sample``
gives in the reference, so that the divergence reaches the loss.

CPU tensors always run the C++ kernels. CUDA tensors run one of three implementations, the
*backend*: ``cuda`` (the C++/CUDA kernels, the default), ``triton`` (``ops_dcnv3.triton_ops``)
or ``reference``, chosen by ``DCNV3_BACKEND`` or :func:`set_backend`. The first call on each
GPU compares the chosen compiled backend with the reference on a small fixed problem (forward
and the three gradients, float64 and float32; :func:`select_backend`) and, if it disagrees or
fails, warns once and falls back along cuda -> triton -> reference, so that a miscompiled or
missing kernel costs speed, not silently wrong gradients. ``DCNV3_SELF_CHECK=0`` skips the check.

The C++ CPU kernels exist in copies for several x86-64 instruction sets (:func:`cpu_isa`,
:func:`set_cpu_isa`, ``DCNV3_CPU_ISA``); bfloat16 and float16 inputs are widened to float32 in
the kernels' loops and every sum is accumulated in float32.
"""
import os
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from . import _C  # noqa: F401  (loads the operator registrations)

__all__ = ["dcnv3", "dcnv3_reference", "dcnv3_output_size", "set_backend", "get_backend", "select_backend",
           "CUDA_BACKENDS"]

_ops = torch.ops.ops_dcnv3


def dcnv3_output_size(height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                      dilation_h, dilation_w) -> Tuple[int, int]:
    """Output (Ho, Wo) of the operator for an input of ``height x width``."""
    height_out = (height + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) // stride_h + 1
    width_out = (width + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) // stride_w + 1
    return height_out, width_out


def _check_args(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                dilation_h, dilation_w, group, group_channels, remove_center):
    """The C++ argument check (``csrc/dcnv3.h``, the authority for every call of the op) in
    ``torch._check`` form, for the fake kernel and the reference, with the same words;
    returns (Ho, Wo, P)."""
    for name, t, layout in (("input", input, "(N, H, W, C)"), ("offset", offset, "(N, Ho, Wo, group*P*2)"),
                            ("mask", mask, "(N, Ho, Wo, group*P)")):
        torch._check_type(isinstance(t, torch.Tensor),
                          lambda: f"dcnv3: {name} must be a Tensor, got {type(t).__name__}")
        torch._check(t.dim() == 4, lambda: f"dcnv3: {name} must be 4-D {layout}, got {t.dim()}-D")
    torch._check(input.device == offset.device == mask.device,
                 lambda: f"dcnv3: input, offset and mask must be on the same device, got "
                         f"{input.device}, {offset.device} and {mask.device}")
    torch._check(input.dtype == offset.dtype == mask.dtype,
                 lambda: f"dcnv3: input, offset and mask must have the same dtype, got "
                         f"{input.dtype}, {offset.dtype} and {mask.dtype}")
    torch._check(input.is_floating_point(), lambda: f"dcnv3: tensors must be floating point, got {input.dtype}")
    torch._check(kernel_h > 0 and kernel_w > 0,
                 lambda: f"dcnv3: kernel size must be positive, got {kernel_h}x{kernel_w}")
    torch._check(stride_h > 0 and stride_w > 0, lambda: f"dcnv3: stride must be positive, got {stride_h}x{stride_w}")
    torch._check(dilation_h > 0 and dilation_w > 0,
                 lambda: f"dcnv3: dilation must be positive, got {dilation_h}x{dilation_w}")
    torch._check(pad_h >= 0 and pad_w >= 0, lambda: f"dcnv3: padding must be non-negative, got {pad_h}x{pad_w}")
    torch._check(group > 0 and group_channels > 0,
                 lambda: f"dcnv3: group and group_channels must be positive, got {group} and {group_channels}")
    # A 1x1 kernel without its centre would have no sampling point at all (P = 0).
    torch._check(not remove_center or (kernel_h == kernel_w and kernel_h % 2 == 1 and kernel_h > 1),
                 lambda: f"dcnv3: remove_center needs an odd square kernel larger than 1x1, got {kernel_h}x{kernel_w}")
    n, h, w, c = input.shape
    torch._check(c == group * group_channels,
                 lambda: f"dcnv3: input has {c} channels, expected group * group_channels = "
                         f"{group} * {group_channels} = {group * group_channels}")
    ho, wo = dcnv3_output_size(h, w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    torch._check(ho > 0 and wo > 0,
                 lambda: f"dcnv3: output size would be zero or less for input {h}x{w}, kernel {kernel_h}x{kernel_w}, "
                         f"padding {pad_h}x{pad_w}, dilation {dilation_h}x{dilation_w}")
    points = kernel_h * kernel_w - int(remove_center)
    want_offset, want_mask = [n, ho, wo, group * points * 2], [n, ho, wo, group * points]
    torch._check(list(offset.shape) == want_offset,
                 lambda: f"dcnv3: offset must have shape (N, Ho, Wo, group*P*2) = {want_offset}, "
                         f"got {list(offset.shape)}")
    torch._check(list(mask.shape) == want_mask,
                 lambda: f"dcnv3: mask must have shape (N, Ho, Wo, group*P) = {want_mask}, got {list(mask.shape)}")
    return ho, wo, points


def _derive_group_channels(input, group, group_channels):
    if group_channels is not None:
        return group_channels
    torch._check(isinstance(input, torch.Tensor) and input.dim() == 4,
                 lambda: "dcnv3: input must be 4-D (N, H, W, C) to derive group_channels from it")
    torch._check(group > 0 and input.shape[-1] % group == 0,
                 lambda: f"dcnv3: input has {input.shape[-1]} channels, not divisible by group={group}")
    return input.shape[-1] // group


def dcnv3(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
          dilation_h, dilation_w, group, group_channels=None, offset_scale=1.0, remove_center=False,
          softmax=False):
    """DCNv3 core op on the compiled kernels (see the module docstring): the C++ kernels for
    CPU tensors, the chosen backend (:func:`get_backend`) for CUDA tensors.

    Only normalises its arguments: the kernels check them (``RuntimeError`` naming the
    problem), for this function, direct ``torch.ops.ops_dcnv3`` calls and exported graphs
    alike. ``group_channels=None`` takes ``C // group`` of the input.

    With ``softmax=True`` the mask holds logits, normalised over the P points of each
    group inside the kernels (the DCNv3 module's softmax, fused: no extra pass over the
    mask in either direction).

    Under autocast, the three tensors are cast to the autocast dtype first (in a model the
    projections come out in that dtype while the mask softmax stays in float32).
    """
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        input, offset, mask = input.to(dtype), offset.to(dtype), mask.to(dtype)
    group_channels = _derive_group_channels(input, group, group_channels)
    implementation = _dcnv3_kernels
    if device_type == "cuda":
        implementation = _IMPLEMENTATIONS[_chosen_backend(input.device.index)]
    return implementation(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                          dilation_w, group, group_channels, offset_scale, remove_center, softmax)


def _dcnv3_kernels(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                   dilation_w, group, group_channels, offset_scale=1.0, remove_center=False, softmax=False):
    """The C++ (CPU) / CUDA kernels, called directly."""
    group_channels = _derive_group_channels(input, group, group_channels)
    return _ops.dcnv3_forward(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                              dilation_h, dilation_w, group, group_channels, float(offset_scale),
                              bool(remove_center), bool(softmax))


def _dcnv3_triton(*args, **kwargs):
    """``ops_dcnv3.triton_ops.dcnv3_triton``, imported on first use: Triton is needed only by
    the GPUs that choose it."""
    from .triton_ops import dcnv3_triton

    return dcnv3_triton(*args, **kwargs)


# --- torch.library registrations: fake kernels and autograd -------------------

@torch.library.register_fake("ops_dcnv3::dcnv3_forward")
def _dcnv3_forward_fake(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                        dilation_h, dilation_w, group, group_channels, offset_scale, remove_center,
                        softmax=False):
    ho, wo, _ = _check_args(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                            dilation_h, dilation_w, group, group_channels, remove_center)
    return input.new_empty((input.shape[0], ho, wo, input.shape[3]))


@torch.library.register_fake("ops_dcnv3::dcnv3_backward")
def _dcnv3_backward_fake(grad_output, input, offset, mask, *args):
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)


def _setup_context(ctx, inputs, output):
    input, offset, mask, *params = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.params = params


def _backward(ctx, grad_output):
    needed = ctx.needs_input_grad[:3]
    if not any(needed):
        return (None,) * (3 + len(ctx.params))
    input, offset, mask = ctx.saved_tensors
    grads = _ops.dcnv3_backward(grad_output, input, offset, mask, *ctx.params)
    return tuple(g if need else None for g, need in zip(grads, needed)) + (None,) * len(ctx.params)


torch.library.register_autograd("ops_dcnv3::dcnv3_forward", _backward, setup_context=_setup_context)


# --- pure PyTorch reference ---------------------------------------------------

def dcnv3_reference(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                    dilation_h, dilation_w, group, group_channels=None, offset_scale=1.0, remove_center=False,
                    softmax=False):
    """DCNv3 core op in plain PyTorch (``F.grid_sample``), the numerical reference.

    Sampling locations are built in the input's dtype, and the image is not padded:
    ``grid_sample``'s zero padding gives the zeros outside the image, which also makes
    unequal ``pad_h``/``pad_w`` correct.
    """
    group_channels = _derive_group_channels(input, group, group_channels)
    ho, wo, points = _check_args(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                 dilation_h, dilation_w, group, group_channels, remove_center)
    n, h, w, _ = input.shape
    dtype, device = input.dtype, input.device
    half_w = dilation_w * (kernel_w - 1) // 2
    half_h = dilation_h * (kernel_h - 1) // 2
    # Regular grid of the kernel points, x-major, centre removed if asked.
    i, j = torch.meshgrid(torch.arange(kernel_w, device=device), torch.arange(kernel_h, device=device),
                          indexing="ij")
    grid_x = (i * dilation_w - half_w).reshape(-1)
    grid_y = (j * dilation_h - half_h).reshape(-1)
    if remove_center:
        keep = (i.reshape(-1) != kernel_w // 2) | (j.reshape(-1) != kernel_h // 2)
        grid_x, grid_y = grid_x[keep], grid_y[keep]
    kernel_grid = torch.stack([grid_x, grid_y], -1).to(dtype)  # (P, 2)
    centres_x = torch.arange(wo, device=device, dtype=dtype) * stride_w - pad_w + half_w
    centres_y = torch.arange(ho, device=device, dtype=dtype) * stride_h - pad_h + half_h
    centres = torch.stack(torch.meshgrid(centres_x, centres_y, indexing="xy"), -1)  # (Ho, Wo, 2)
    offset = offset.reshape(n, ho, wo, group, points, 2)
    locations = centres[None, :, :, None, None, :] + (kernel_grid + offset) * offset_scale
    # Pixel coordinates -> grid_sample's [-1, 1] (align_corners=False: pixel k is at (2k+1)/size - 1).
    size = torch.tensor([w, h], dtype=dtype, device=device)
    sampling_grid = (2 * locations + 1) / size - 1
    sampling_grid = sampling_grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, ho * wo, points, 2)
    image = input.reshape(n, h, w, group, group_channels).permute(0, 3, 4, 1, 2)
    image = image.reshape(n * group, group_channels, h, w)
    sampled = F.grid_sample(image, sampling_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = mask.reshape(n, ho * wo, group, points)
    if softmax:
        weights = weights.softmax(-1)
    weights = weights.permute(0, 2, 1, 3).reshape(n * group, 1, ho * wo, points)
    output = (sampled * weights).sum(-1)  # (N*G, Cg, Ho*Wo)
    return output.reshape(n, group * group_channels, ho, wo).permute(0, 2, 3, 1).contiguous()


# --- choice of the CUDA implementation (backend) and its self-check -------------

#: The implementations for CUDA tensors, in fallback order.
CUDA_BACKENDS = ("cuda", "triton", "reference")
_IMPLEMENTATIONS: Dict[str, Callable] = {"cuda": _dcnv3_kernels, "triton": _dcnv3_triton,
                                         "reference": dcnv3_reference}
_backend_override: Optional[str] = None
_verdicts: Dict[Tuple[str, str], Optional[str]] = {}  # (backend, device) -> None (passed) or what failed
_choices: Dict[str, str] = {}  # device -> backend in use


def _valid_backend(name, source):
    if name not in CUDA_BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(CUDA_BACKENDS)}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Choose the implementation for CUDA tensors: ``'cuda'``, ``'triton'`` or ``'reference'``;
    ``None`` goes back to ``DCNV3_BACKEND`` (default ``'cuda'``). Takes effect at the next call
    (a graph compiled by ``torch.compile`` keeps the backend it was traced with)."""
    global _backend_override
    _backend_override = None if name is None else _valid_backend(name, "set_backend(name)")
    _choices.clear()


def get_backend(device=None) -> str:
    """The implementation that ``dcnv3`` uses on ``device`` (default: the current CUDA device):
    ``'cpu'`` for CPU tensors (always the C++ kernels), otherwise the chosen CUDA backend after
    its self-check and any fallback (see :func:`select_backend`). Runs the check on first use."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return "cpu"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _choices:
        preferred = _backend_override or _valid_backend(os.environ.get("DCNV3_BACKEND", "cuda"), "DCNV3_BACKEND")
        self_check = os.environ.get("DCNV3_SELF_CHECK", "1") != "0" and not torch.cuda.is_current_stream_capturing()
        _choices[key] = select_backend(device, _IMPLEMENTATIONS, preferred, self_check=self_check)
    return _choices[key]


def cpu_isa() -> str:
    """The copy of the CPU kernels that runs: ``'baseline'`` (x86-64 / any), ``'avx2'``
    (AVX2+FMA+F16C) or ``'avx512'``. Default (``'auto'``): AVX2 where the CPU has it, else the
    baseline; ``DCNV3_CPU_ISA`` or :func:`set_cpu_isa` choose another."""
    return torch.ops.ops_dcnv3.cpu_isa()


def set_cpu_isa(name: str) -> str:
    """Run the CPU kernels compiled for ``name`` (``'baseline'``, ``'avx2'``, ``'avx512'`` or
    ``'auto'``) from the next call on, in every thread; returns the previous choice. A set that
    this CPU cannot run raises ``RuntimeError`` (never an illegal instruction)."""
    return torch.ops.ops_dcnv3.set_cpu_isa(name)


def supported_cpu_isas() -> List[str]:
    """The kernel copies this CPU can run, e.g. ``['baseline', 'avx2']``."""
    return list(torch.ops.ops_dcnv3.supported_cpu_isas())


@torch.compiler.assume_constant_result
def _chosen_backend(index: Optional[int]) -> str:
    # torch.compile runs this once while tracing (self-check included) and keeps the name.
    return get_backend(torch.device("cuda", index))


def select_backend(device, implementations: Mapping[str, Callable], preferred: str = "cuda",
                   self_check: bool = True, verdicts: Optional[Dict[Tuple[str, str], Optional[str]]] = None) -> str:
    """The first backend, from ``preferred`` along :data:`CUDA_BACKENDS`, whose implementation
    agrees with the reference on ``device``.

    Each backend is checked once per device (the verdict is kept in ``verdicts``, by default
    this process's cache) by :func:`_self_check_error`; a backend that fails gets one warning
    naming it and what failed, and the next one is tried. The reference is not checked. With
    ``self_check=False``, ``preferred`` is returned unchecked.

    Args:
        device: where to run the check (any device, so that the logic can be tested on CPU).
        implementations: backend name -> function with the arguments of :func:`dcnv3`.
        preferred: the backend asked for (``DCNV3_BACKEND`` / :func:`set_backend`).
        self_check: whether to check at all (``DCNV3_SELF_CHECK``).
        verdicts: cache of ``(backend, device) -> None | error text``.
    """
    _valid_backend(preferred, "the backend")
    if not self_check:
        return preferred
    verdicts = _verdicts if verdicts is None else verdicts
    chain = CUDA_BACKENDS[CUDA_BACKENDS.index(preferred):]
    for name, fallback in zip(chain[:-1], chain[1:]):  # the chain ends with the reference, never checked
        key = (name, str(device))
        if key not in verdicts:
            verdicts[key] = _self_check_error(implementations[name], device)
            if verdicts[key] is not None:
                warnings.warn(f"ops_dcnv3: the {name!r} DCNv3 backend failed its self-check on {device}: "
                              f"{verdicts[key]}. Falling back to {fallback!r} (set DCNV3_BACKEND to choose, "
                              "DCNV3_SELF_CHECK=0 to skip the check).", RuntimeWarning, stacklevel=2)
        if verdicts[key] is None:
            return name
    return "reference"


# Two small problems that between them cover stride, padding, dilation, remove_center, the
# fused softmax, non-power-of-two group_channels and sampling points outside the image.
_SELF_CHECK_PROBLEMS = (
    # dtype, relative tolerance, (n, h, w), params after the tensors, softmax
    (torch.float64, 1e-9, (2, 5, 6), (3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0, False), False),
    (torch.float32, 1e-4, (1, 7, 6), (3, 3, 2, 1, 2, 1, 2, 1, 2, 5, 1.5, True), True),
)


def _self_check_error(implementation, device) -> Optional[str]:
    """None if ``implementation`` gives the reference's output and three gradients on
    ``device`` for :data:`_SELF_CHECK_PROBLEMS`, else a line saying what differed or what it raised.

    Runs outside any torch.compile / export tracing mode, autocast, no_grad or inference mode
    that the first call happens in, on inputs built on the CPU from a fixed seed; the reference
    runs on the CPU in float64.
    """
    with _disable_current_modes(), torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(torch.device(device).type, enabled=False):
        try:
            for dtype, tolerance, (n, h, w), params, softmax in _SELF_CHECK_PROBLEMS:
                problem = _self_check_problem(n, h, w, params)
                expected = _output_and_grads(dcnv3_reference, problem, params, softmax)
                got = _output_and_grads(implementation, [t.to(device, dtype) for t in problem], params, softmax)
                for name, value, reference in zip(("output", "grad_input", "grad_offset", "grad_mask"), got,
                                                  expected):
                    if value is None:
                        return f"{name} is missing (the implementation is not differentiable)"
                    error = ((value.detach().to("cpu", torch.float64) - reference).abs().max()
                             / reference.abs().max()).item()
                    if not error <= tolerance:  # NaN fails too
                        return (f"{name} ({str(dtype).replace('torch.', '')}, softmax={softmax}) differs from the "
                                f"reference by {error:.3g} (relative, tolerance {tolerance:g})")
        except Exception as exc:  # whatever breaks, the caller falls back
            return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def _self_check_problem(n, h, w, params):
    kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels = params[:10]
    ho, wo = dcnv3_output_size(h, w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    points = kernel_h * kernel_w - int(params[11])
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(n, h, w, group * group_channels, generator=generator, dtype=torch.float64)
    offset = (torch.rand(n, ho, wo, group * points * 2, generator=generator, dtype=torch.float64) * 2 - 1) * 2.5
    mask = torch.randn(n, ho, wo, group * points, generator=generator, dtype=torch.float64)
    return [input, offset, mask]


def _output_and_grads(implementation, tensors, params, softmax):
    tensors = [t.detach().requires_grad_() for t in tensors]
    output = implementation(*tensors, *params, softmax=softmax)
    grad_output = torch.linspace(-1, 1, output.numel(), dtype=torch.float64).reshape(output.shape)
    output.backward(grad_output.to(output.device, output.dtype))
    return [output] + [t.grad for t in tensors]
