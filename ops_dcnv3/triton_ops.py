"""DCNv3 in Triton: forward and backward kernels, registered as ``torch.library.triton_op``.

A second GPU implementation of the operator of ``ops_dcnv3.functions`` (same arguments, same
semantics, including ``softmax=True`` and the NaN rules for non-finite sampling locations),
written so that it can be checked without a GPU: under Triton's interpreter
(``TRITON_INTERPRET=1``) the same kernels run on CPU tensors. ``triton.jit`` picks the
interpreter when a function is decorated, and Triton's own library (``tl.sum``, ``tl.max``)
is decorated when ``triton`` is first imported, so the variable must be set before the first
``import triton`` of the process and stay set (``tests/conftest.py`` does this on machines
without a GPU).

Both ops (``ops_dcnv3::dcnv3_triton_forward`` / ``dcnv3_triton_backward``) are
``triton_op``s whose kernels are launched through ``wrap_triton``, so ``torch.compile`` and
export trace into them, and the backward is an op of its own, as for the C++ kernels. (Under
the interpreter they are opaque custom ops instead: interpreted kernels cannot be traced.)

Layout of the work: one program per (block of output pixels, group). It holds a
``BLOCK_PIX x BLOCK_C`` tile (``BLOCK_C`` = ``group_channels`` rounded up to a power of two,
the excess masked off) and loops over the P sampling points. Arithmetic is in float32 for
float16/bfloat16/float32 tensors and in float64 for float64 tensors, on GPU too (Triton
supports float64 loads, arithmetic and atomics on NVIDIA GPUs, at float64 speed). The
backward reduces the offset and mask gradients over the channels inside the program (one
writer per slot) and scatters the input gradient with ``tl.atomic_add`` into a float32 (or
float64) buffer, so the input gradient's summation order, and its last bits, vary from run
to run on a GPU.
"""
import warnings

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from .functions import _check_args, _derive_group_channels

__all__ = ["dcnv3_triton", "INTERPRETED"]

#: Whether these kernels run in Triton's interpreter (on CPU tensors) instead of compiled (on GPU).
INTERPRETED = bool(triton.knobs.runtime.interpret)


# Sizes that change from call to call: Triton would otherwise compile a variant for each
# combination of them being 1 or multiples of 16. group and group_channels stay specialised
# (their alignment lets channel loads vectorise).
_UNSPECIALISED = ("pixels", "height", "width", "height_out", "width_out", "stride_h", "stride_w", "pad_h", "pad_w",
                  "dilation_h", "dilation_w", "half_h", "half_w")

# Device functions are few and coarse on purpose: the interpreter re-patches triton.language on
# every device-function call, which costs more than the arithmetic of a small problem.

@triton.jit
def _output_pixels(pixels, width_out, height_out, BLOCK_PIX: tl.constexpr):
    """This program's output pixels as (flat index, n, ho, wo, in range), int64."""
    pix = tl.program_id(0).to(tl.int64) * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    in_range = pix < pixels
    wo = pix % width_out
    ho = (pix // width_out) % height_out
    n = pix // (width_out * height_out)
    return pix, n, ho, wo, in_range


@triton.jit
def _point_weights(mask_ptr, mask_row, in_range, SOFTMAX: tl.constexpr, POINTS: tl.constexpr,
                   BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """The P mask weights of each pixel's group as a (BLOCK_PIX, BLOCK_P) tile, zero beyond P:
    the mask values, or with SOFTMAX their softmax over the points (the mask holds logits)."""
    cols = tl.arange(0, BLOCK_P)
    valid = cols[None, :] < POINTS
    values = tl.load(mask_ptr + mask_row[:, None] + cols[None, :], mask=in_range[:, None] & valid, other=0.0)
    values = values.to(ACC)
    if SOFTMAX:
        logits = tl.where(valid, values, float("-inf"))
        exp = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        values = exp / tl.sum(exp, axis=1)[:, None]
    return values


@triton.jit
def _sample_point(input_ptr, offset_ptr, image_base, offset_row, p, pix_x, pix_y, in_range, c, c_mask, scale,
                  height, width, channels, dilation_h, dilation_w, half_h, half_w,
                  KERNEL_H: tl.constexpr, REMOVE_CENTER: tl.constexpr, CENTER: tl.constexpr, ACC: tl.constexpr):
    """Bilinear sampling of point ``p`` for each pixel of the block (SPEC section 3).

    Returns ``finite`` (the location is finite), the corner weights along x (``hx``, ``lx``)
    and y (``hy``, ``ly``), the four corner tiles (top-left, top-right, bottom-left,
    bottom-right; zero outside the image), and per corner its element offset in the image and
    whether it was read. Locations outside the open box (-1, W) x (-1, H), non-finite ones
    included, read nothing; they are moved to 0 first so that ``floor`` and the integer
    conversion stay defined.
    """
    if REMOVE_CENTER:  # the offset and mask tensors have no slot for the centre: skip its grid position
        q = p + (p >= CENTER)
    else:
        q = p
    i = q // KERNEL_H  # along x
    j = q % KERNEL_H  # along y
    dx = tl.load(offset_ptr + offset_row + 2 * p, mask=in_range, other=0.0).to(ACC)
    dy = tl.load(offset_ptr + offset_row + 2 * p + 1, mask=in_range, other=0.0).to(ACC)
    x = pix_x + ((i * dilation_w - half_w).to(ACC) + dx) * scale
    y = pix_y + ((j * dilation_h - half_h).to(ACC) + dy) * scale

    finite = (tl.abs(x) < float("inf")) & (tl.abs(y) < float("inf"))
    inside = in_range & (x > -1) & (x < width) & (y > -1) & (y < height)
    x = tl.where(inside, x, 0.0)
    y = tl.where(inside, y, 0.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    lx = x - x0f
    ly = y - y0f
    x0 = x0f.to(tl.int64)
    y0 = y0f.to(tl.int64)
    ok_x0 = inside & (x0 >= 0)
    ok_x1 = inside & (x0 + 1 < width)
    ok00 = ok_x0 & (y0 >= 0)
    ok01 = ok_x1 & (y0 >= 0)
    ok10 = ok_x0 & (y0 + 1 < height)
    ok11 = ok_x1 & (y0 + 1 < height)
    at00 = (y0 * width + x0) * channels
    at01 = at00 + channels
    at10 = at00 + width * channels
    at11 = at10 + channels
    row = input_ptr + image_base[:, None] + c[None, :]
    v00 = tl.load(row + at00[:, None], mask=ok00[:, None] & c_mask[None, :], other=0.0).to(ACC)
    v01 = tl.load(row + at01[:, None], mask=ok01[:, None] & c_mask[None, :], other=0.0).to(ACC)
    v10 = tl.load(row + at10[:, None], mask=ok10[:, None] & c_mask[None, :], other=0.0).to(ACC)
    v11 = tl.load(row + at11[:, None], mask=ok11[:, None] & c_mask[None, :], other=0.0).to(ACC)
    return (finite, 1 - lx, lx, 1 - ly, ly, v00, v01, v10, v11,
            at00, ok00, at01, ok01, at10, ok10, at11, ok11)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _dcnv3_forward_kernel(
        input_ptr, offset_ptr, mask_ptr, scale_ptr, output_ptr,
        pixels, height, width, height_out, width_out, group, group_channels,
        stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, half_h, half_w,
        KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, REMOVE_CENTER: tl.constexpr, SOFTMAX: tl.constexpr,
        FP64: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    POINTS: tl.constexpr = KERNEL_H * KERNEL_W - REMOVE_CENTER
    CENTER: tl.constexpr = (KERNEL_W // 2) * KERNEL_H + KERNEL_H // 2
    g = tl.program_id(1)
    channels = group * group_channels
    pix, n, ho, wo, in_range = _output_pixels(pixels, width_out, height_out, BLOCK_PIX)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < group_channels
    image_base = n * height * width * channels + g * group_channels
    offset_row = (pix * group + g) * (POINTS * 2)
    mask_row = (pix * group + g) * POINTS
    scale = tl.load(scale_ptr).to(ACC)
    pix_x = (wo * stride_w - pad_w + half_w).to(ACC)  # the kernel's centre, in input coordinates
    pix_y = (ho * stride_h - pad_h + half_h).to(ACC)
    weights = _point_weights(mask_ptr, mask_row, in_range, SOFTMAX, POINTS, BLOCK_P, ACC)
    cols = tl.arange(0, BLOCK_P)

    acc = tl.zeros((BLOCK_PIX, BLOCK_C), dtype=ACC)
    for p in range(POINTS):
        finite, hx, lx, hy, ly, v00, v01, v10, v11, _, _, _, _, _, _, _, _ = _sample_point(
            input_ptr, offset_ptr, image_base, offset_row, p, pix_x, pix_y, in_range, c, c_mask, scale,
            height, width, channels, dilation_h, dilation_w, half_h, half_w, KERNEL_H, REMOVE_CENTER, CENTER, ACC)
        sample = ((hy * hx)[:, None] * v00 + (hy * lx)[:, None] * v01
                  + (ly * hx)[:, None] * v10 + (ly * lx)[:, None] * v11)
        # A non-finite location poisons its pixel and group, as grid_sample does in the reference.
        sample = tl.where(finite[:, None], sample, float("nan"))
        weight = tl.sum(tl.where(cols[None, :] == p, weights, 0.0), axis=1)
        acc += weight[:, None] * sample

    out_ptrs = output_ptr + (pix * channels + g * group_channels)[:, None] + c[None, :]
    tl.store(out_ptrs, acc.to(output_ptr.dtype.element_ty), mask=in_range[:, None] & c_mask[None, :])


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _dcnv3_backward_kernel(
        grad_output_ptr, input_ptr, offset_ptr, mask_ptr, scale_ptr,
        grad_input_ptr, grad_offset_ptr, grad_mask_ptr,
        pixels, height, width, height_out, width_out, group, group_channels,
        stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, half_h, half_w,
        KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, REMOVE_CENTER: tl.constexpr, SOFTMAX: tl.constexpr,
        FP64: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    POINTS: tl.constexpr = KERNEL_H * KERNEL_W - REMOVE_CENTER
    CENTER: tl.constexpr = (KERNEL_W // 2) * KERNEL_H + KERNEL_H // 2
    g = tl.program_id(1)
    channels = group * group_channels
    pix, n, ho, wo, in_range = _output_pixels(pixels, width_out, height_out, BLOCK_PIX)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < group_channels
    tile_mask = in_range[:, None] & c_mask[None, :]
    image_base = n * height * width * channels + g * group_channels
    offset_row = (pix * group + g) * (POINTS * 2)
    mask_row = (pix * group + g) * POINTS
    scale = tl.load(scale_ptr).to(ACC)
    pix_x = (wo * stride_w - pad_w + half_w).to(ACC)
    pix_y = (ho * stride_h - pad_h + half_h).to(ACC)
    weights = _point_weights(mask_ptr, mask_row, in_range, SOFTMAX, POINTS, BLOCK_P, ACC)
    cols = tl.arange(0, BLOCK_P)
    grad_out = tl.load(grad_output_ptr + (pix * channels + g * group_channels)[:, None] + c[None, :],
                       mask=tile_mask, other=0.0).to(ACC)
    grad_input_row = grad_input_ptr + image_base[:, None] + c[None, :]

    # d loss / d weight of each point (grad_output . sample), gathered column by column.
    grad_weights = tl.zeros((BLOCK_PIX, BLOCK_P), dtype=ACC)
    for p in range(POINTS):
        finite, hx, lx, hy, ly, v00, v01, v10, v11, at00, ok00, at01, ok01, at10, ok10, at11, ok11 = _sample_point(
            input_ptr, offset_ptr, image_base, offset_row, p, pix_x, pix_y, in_range, c, c_mask, scale,
            height, width, channels, dilation_h, dilation_w, half_h, half_w, KERNEL_H, REMOVE_CENTER, CENTER, ACC)
        weight = tl.sum(tl.where(cols[None, :] == p, weights, 0.0), axis=1)

        sample = ((hy * hx)[:, None] * v00 + (hy * lx)[:, None] * v01
                  + (ly * hx)[:, None] * v10 + (ly * lx)[:, None] * v11)
        grad_weight = tl.where(finite, tl.sum(grad_out * sample, axis=1), float("nan"))
        grad_weights = tl.where(cols[None, :] == p, grad_weight[:, None], grad_weights)

        # Offsets: d sample / d location (x and y), times d location / d offset = offset_scale.
        grad_x = tl.sum(grad_out * (hy[:, None] * (v01 - v00) + ly[:, None] * (v11 - v10)), axis=1)
        grad_y = tl.sum(grad_out * (hx[:, None] * (v10 - v00) + lx[:, None] * (v11 - v01)), axis=1)
        grad_x = tl.where(finite, grad_x * weight * scale, float("nan"))
        grad_y = tl.where(finite, grad_y * weight * scale, float("nan"))
        tl.store(grad_offset_ptr + offset_row + 2 * p, grad_x.to(grad_offset_ptr.dtype.element_ty), mask=in_range)
        tl.store(grad_offset_ptr + offset_row + 2 * p + 1, grad_y.to(grad_offset_ptr.dtype.element_ty),
                 mask=in_range)

        # Input: each corner receives its bilinear share of weight * grad_output.
        weighted = weight[:, None] * grad_out
        tl.atomic_add(grad_input_row + at00[:, None], (hy * hx)[:, None] * weighted,
                      mask=ok00[:, None] & c_mask[None, :])
        tl.atomic_add(grad_input_row + at01[:, None], (hy * lx)[:, None] * weighted,
                      mask=ok01[:, None] & c_mask[None, :])
        tl.atomic_add(grad_input_row + at10[:, None], (ly * hx)[:, None] * weighted,
                      mask=ok10[:, None] & c_mask[None, :])
        tl.atomic_add(grad_input_row + at11[:, None], (ly * lx)[:, None] * weighted,
                      mask=ok11[:, None] & c_mask[None, :])

    if SOFTMAX:  # through the softmax: w_q * (g_q - sum_p w_p g_p)
        grad_weights = weights * (grad_weights - tl.sum(weights * grad_weights, axis=1)[:, None])
    tl.store(grad_mask_ptr + mask_row[:, None] + cols[None, :], grad_weights.to(grad_mask_ptr.dtype.element_ty),
             mask=in_range[:, None] & (cols[None, :] < POINTS))


def _launch_config(pixels, group, group_channels, points, backward):
    """Grid and block sizes. On a GPU a tile holds 1024 elements in the forward and 512 in the
    backward (which keeps four corner tiles and more live): the largest that compile for sm_90
    without register spills at 4 warps. The interpreter runs programs one after another and
    pays per operation, not per element, so it gets the largest pixel blocks."""
    block_c = triton.next_power_of_2(group_channels)
    if INTERPRETED:
        block_pix = min(1024, triton.next_power_of_2(pixels))
    else:
        block_pix = max(4, min(64, (512 if backward else 1024) // block_c))
    grid = (triton.cdiv(pixels, block_pix), group)
    return grid, dict(BLOCK_PIX=block_pix, BLOCK_C=block_c, BLOCK_P=triton.next_power_of_2(points))


def _geometry(input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
              group_channels, height_out, width_out):
    n, h, w, _ = input.shape
    half_h = dilation_h * (kernel_h - 1) // 2
    half_w = dilation_w * (kernel_w - 1) // 2
    return (n * height_out * width_out, h, w, height_out, width_out, group, group_channels, stride_h, stride_w,
            pad_h, pad_w, dilation_h, dilation_w, half_h, half_w)


def _define_op(name):
    """``triton_op`` (torch.compile and export trace into the kernels) when the kernels are
    compiled; under the interpreter, which runs them as Python on real data and so cannot be
    traced, an opaque ``custom_op`` with the same function as its fake kernel (see ``_launch``)."""
    def define(fn):
        if not INTERPRETED:
            return triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op
    return define


def _launch(kernel, grid, *args, **kwargs):
    """Launch through ``wrap_triton`` (a traceable call under torch.compile). Fake tensors reach
    here only as the fake kernel of the interpreter's opaque ops: shapes only, nothing to run."""
    if INTERPRETED and is_fake(args[0]):
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


def _offset_scale_tensor(offset_scale: float, input: torch.Tensor) -> torch.Tensor:
    # A float kernel argument would be float32; from a tensor, float64 tensors get it exactly.
    return torch.full((1,), offset_scale, dtype=input.dtype, device=input.device)


@_define_op("ops_dcnv3::dcnv3_triton_forward")
def _dcnv3_triton_forward(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int,
                          kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                          dilation_w: int, group: int, group_channels: int, offset_scale: float,
                          remove_center: bool, softmax: bool) -> torch.Tensor:
    height_out, width_out, points = _check_args(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                                pad_w, dilation_h, dilation_w, group, group_channels, remove_center)
    input, offset, mask = input.contiguous(), offset.contiguous(), mask.contiguous()
    output = input.new_empty((input.shape[0], height_out, width_out, input.shape[3]))
    geometry = _geometry(input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                         group_channels, height_out, width_out)
    if geometry[0] > 0:
        grid, blocks = _launch_config(geometry[0], group, group_channels, points, backward=False)
        _launch(_dcnv3_forward_kernel, grid, input, offset, mask, _offset_scale_tensor(offset_scale, input), output,
                *geometry, KERNEL_H=kernel_h, KERNEL_W=kernel_w, REMOVE_CENTER=int(remove_center), SOFTMAX=softmax,
                FP64=input.dtype == torch.float64, **blocks)
    return output


@_define_op("ops_dcnv3::dcnv3_triton_backward")
def _dcnv3_triton_backward(grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor,
                           mask: torch.Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
                           pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
                           group_channels: int, offset_scale: float, remove_center: bool,
                           softmax: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    height_out, width_out, points = _check_args(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                                pad_w, dilation_h, dilation_w, group, group_channels, remove_center)
    torch._check(grad_output.shape == (input.shape[0], height_out, width_out, input.shape[3]),
                 lambda: f"dcnv3: grad_output must have the output's shape "
                         f"{[input.shape[0], height_out, width_out, input.shape[3]]}, got {list(grad_output.shape)}")
    grad_output = grad_output.to(input.dtype).contiguous()
    input, offset, mask = input.contiguous(), offset.contiguous(), mask.contiguous()
    # Atomics accumulate in float32 (float64 for float64) whatever the tensors' type.
    accumulation = torch.float64 if input.dtype == torch.float64 else torch.float32
    grad_input = torch.zeros(input.shape, dtype=accumulation, device=input.device)
    grad_offset = torch.empty_like(offset)
    grad_mask = torch.empty_like(mask)
    geometry = _geometry(input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                         group_channels, height_out, width_out)
    if geometry[0] > 0:
        grid, blocks = _launch_config(geometry[0], group, group_channels, points, backward=True)
        _launch(_dcnv3_backward_kernel, grid, grad_output, input, offset, mask,
                _offset_scale_tensor(offset_scale, input), grad_input, grad_offset, grad_mask, *geometry,
                KERNEL_H=kernel_h, KERNEL_W=kernel_w, REMOVE_CENTER=int(remove_center), SOFTMAX=softmax,
                FP64=input.dtype == torch.float64, **blocks)
    return grad_input.to(input.dtype), grad_offset, grad_mask


def _setup_context(ctx, inputs, output):
    input, offset, mask, *params = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.params = params


def _backward(ctx, grad_output):
    needed = ctx.needs_input_grad[:3]
    if not any(needed):
        return (None,) * (3 + len(ctx.params))
    if torch.are_deterministic_algorithms_enabled():
        # As the CUDA kernels report through alertNotDeterministic: the input gradient is
        # accumulated with atomics, so its last bits vary from run to run.
        message = ("dcnv3_triton backward does not have a deterministic implementation (its input gradient "
                   "is accumulated with atomics); the CPU kernels are deterministic")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    grads = torch.ops.ops_dcnv3.dcnv3_triton_backward(grad_output, *ctx.saved_tensors, *ctx.params)
    return tuple(g if need else None for g, need in zip(grads, needed)) + (None,) * len(ctx.params)


_dcnv3_triton_forward.register_autograd(_backward, setup_context=_setup_context)


def dcnv3_triton(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                 group, group_channels=None, offset_scale=1.0, remove_center=False, softmax=False):
    """DCNv3 core op on the Triton kernels: the arguments, result and gradients of
    :func:`ops_dcnv3.dcnv3` (``softmax=True``: the mask holds logits, normalised over the P
    points of each group inside the kernels). CUDA tensors on a GPU; CPU tensors only under
    the interpreter (see the module docstring).
    """
    if isinstance(input, torch.Tensor) and input.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("dcnv3_triton: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 in the "
                           "environment before triton is first imported, or pass CUDA tensors")
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        input, offset, mask = input.to(dtype), offset.to(dtype), mask.to(dtype)
    group_channels = _derive_group_channels(input, group, group_channels)
    return torch.ops.ops_dcnv3.dcnv3_triton_forward(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w,
                                                    pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
                                                    float(offset_scale), bool(remove_center), bool(softmax))
