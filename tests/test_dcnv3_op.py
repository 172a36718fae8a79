"""The DCNv3 operator: parity with the official fixtures and the reference, gradients,
registration (opcheck, torch.compile), dtypes, threads and bad input."""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ops_dcnv3
from ops_dcnv3 import dcnv3, dcnv3_output_size, dcnv3_reference

FIXTURES = Path(__file__).resolve().parent / "data" / "official"
PARAM_NAMES = ["kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w",
               "group", "group_channels", "offset_scale", "remove_center"]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_case(n, h, w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
              group_channels, offset_scale, remove_center, dtype=torch.float64, offset_range=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ho, wo = dcnv3_output_size(h, w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    points = kernel_h * kernel_w - int(remove_center)
    input = torch.randn(n, h, w, group * group_channels, generator=gen, dtype=torch.float64)
    offset = (torch.rand(n, ho, wo, group * points * 2, generator=gen, dtype=torch.float64) * 2 - 1) * offset_range
    mask = torch.rand(n, ho, wo, group, points, generator=gen, dtype=torch.float64).softmax(-1).reshape(n, ho, wo, -1)
    params = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
              offset_scale, remove_center)
    return input.to(dtype), offset.to(dtype), mask.to(dtype), params


def run_with_grads(fn, input, offset, mask, params, grad_output=None):
    """fn's output and the gradients of input, offset and mask for `grad_output` (default:
    seeded normal values, the same on every device), which goes to the output's device
    and dtype."""
    tensors = [t.detach().clone().requires_grad_() for t in (input, offset, mask)]
    out = fn(*tensors, *params)
    if grad_output is None:
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_output.to(device=out.device, dtype=out.dtype))
    return out.detach(), [t.grad for t in tensors]


def test_run_with_grads_puts_grad_output_on_the_outputs_device():
    # The CUDA tests call it with CUDA tensors: a grad_output left on the CPU made every
    # one of them fail in backward. The meta device stands in for CUDA here.
    input, offset, mask, params = make_case(1, 4, 5, 3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0, False)
    seen = []

    def fn(i, o, m, *params):
        seen.append(params)
        return i * 2 + o.sum() * m.sum()

    out, grads = run_with_grads(fn, *(t.to("meta") for t in (input, offset, mask)), params)
    assert seen == [params]
    assert out.device.type == "meta" and all(g.device.type == "meta" and g.shape == t.shape
                                            for g, t in zip(grads, (input, offset, mask)))
    # The default grad_output does not depend on the device: CPU and GPU runs compare.
    _, (grad_input, _, _) = run_with_grads(fn, input, offset, mask, params)
    expected = torch.randn(input.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    torch.testing.assert_close(grad_input, expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def official_cases():
    return torch.load(FIXTURES / "dcnv3_op_cases.pt", weights_only=True)  # committed: missing is a failure


@pytest.mark.parametrize("fn", [dcnv3, dcnv3_reference], ids=["kernels", "reference"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_official_fixture_cases(official_cases, fn, dtype, tol):
    assert len(official_cases) >= 5
    for case in official_cases:
        params = tuple(case["params"][k] for k in PARAM_NAMES)
        params = params[:-1] + (bool(params[-1]),)
        out, grads = run_with_grads(fn, case["input"].to(dtype), case["offset"].to(dtype), case["mask"].to(dtype),
                                    params, case["grad_output"])
        assert rel_err(out.double(), case["output"]) < tol, case["params"]
        for grad, name in zip(grads, ("grad_input", "grad_offset", "grad_mask")):
            assert rel_err(grad.double(), case[name]) < tol, (name, case["params"])


def random_configs(count, seed):
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        kernel_h, kernel_w = rng.randint(1, 7), rng.randint(1, 7)
        remove_center = kernel_h == kernel_w and kernel_h % 2 == 1 and kernel_h > 1 and rng.random() < 0.4
        cfg = dict(n=rng.randint(1, 2), h=rng.randint(3, 13), w=rng.randint(3, 13), kernel_h=kernel_h,
                   kernel_w=kernel_w, stride_h=rng.randint(1, 3), stride_w=rng.randint(1, 3),
                   pad_h=rng.randint(0, 3), pad_w=rng.randint(0, 3), dilation_h=rng.randint(1, 2),
                   dilation_w=rng.randint(1, 2), group=rng.choice([1, 2, 3, 5]),
                   group_channels=rng.choice([1, 3, 4, 6, 8, 17]), offset_scale=rng.choice([0.1, 0.5, 1.0, 2.0]),
                   remove_center=remove_center, offset_range=rng.choice([0.5, 2.0, 8.0]), seed=rng.randint(0, 10**6))
        ho, wo = dcnv3_output_size(cfg["h"], cfg["w"], kernel_h, kernel_w, cfg["stride_h"], cfg["stride_w"],
                                   cfg["pad_h"], cfg["pad_w"], cfg["dilation_h"], cfg["dilation_w"])
        if ho > 0 and wo > 0:
            configs.append(cfg)
    return configs


# The shapes of the real models: 3x3 kernels, group_channels 16 (InternImage-T..XL) and 32
# (H, G), remove_center (the models that set it), offset_scale 1.0 and 0.1 (not exact in
# float32), stride and dilation.
MODEL_CONFIGS = [
    dict(n=2, h=9, w=8, kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1,
         dilation_w=1, group=4, group_channels=16, offset_scale=1.0, remove_center=False, offset_range=2.0, seed=16),
    dict(n=2, h=9, w=8, kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1,
         dilation_w=1, group=3, group_channels=16, offset_scale=0.1, remove_center=True, offset_range=8.0, seed=17),
    dict(n=1, h=10, w=9, kernel_h=3, kernel_w=3, stride_h=2, stride_w=1, pad_h=2, pad_w=1, dilation_h=2,
         dilation_w=1, group=2, group_channels=32, offset_scale=1.0, remove_center=True, offset_range=2.0, seed=32),
    dict(n=2, h=7, w=8, kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1,
         dilation_w=1, group=2, group_channels=32, offset_scale=0.1, remove_center=False, offset_range=8.0, seed=33),
]


def logits_like(mask, seed, scale=3.0):
    """Softmax logits of any scale, far from uniform (the module's zero-initialised mask
    weights give equal logits, which test little)."""
    return torch.randn(mask.shape, dtype=mask.dtype, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
@pytest.mark.parametrize("cfg", random_configs(40, seed=2024) + MODEL_CONFIGS, ids=lambda c: str(c["seed"]))
def test_matches_reference_on_random_cases(cfg, softmax):
    input, offset, mask, params = make_case(**cfg)
    if softmax:
        mask = logits_like(mask, cfg["seed"])
    assert_kernels_match_reference(input, offset, mask, params + (softmax,), cfg)


def assert_kernels_match_reference(input, offset, mask, params, cfg):
    """Output within 1e-10 and gradients within 1e-9 (relative, float64) of the reference."""
    out, grads = run_with_grads(dcnv3, input, offset, mask, params)
    ref_out, ref_grads = run_with_grads(dcnv3_reference, input, offset, mask, params)
    assert rel_err(out, ref_out) < 1e-10, cfg
    for grad, ref, name in zip(grads, ref_grads, ("input", "offset", "mask")):
        assert rel_err(grad, ref) < 1e-9, (name, cfg)


def test_unequal_padding_follows_the_spec():
    # Centre-only kernel with zero offsets is a shifted copy: output pixel (ho, wo) reads
    # input (ho - pad_h + 1, wo - pad_w + 1) for a 3x3 kernel.
    input, offset, mask, params = make_case(1, 6, 7, 3, 3, 1, 1, 2, 0, 1, 1, 1, 2, 1.0, False)
    offset.zero_()
    mask.zero_()
    mask[..., 4] = 1.0  # point (i=1, j=1), the centre
    out = dcnv3(input, offset, mask, *params)
    assert out.shape == (1, 8, 5, 2)
    expected = torch.zeros_like(out)
    for ho in range(8):
        for wo in range(5):
            y, x = ho - 2 + 1, wo - 0 + 1
            if 0 <= y < 6 and 0 <= x < 7:
                expected[0, ho, wo] = input[0, y, x]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(dcnv3_reference(input, offset, mask, *params), expected)


def test_gradcheck_float64():
    for cfg in [dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, group=2, remove_center=False),
                dict(kernel_h=3, kernel_w=3, stride_h=2, stride_w=1, pad_h=0, pad_w=2, group=1, remove_center=True),
                dict(kernel_h=2, kernel_w=3, stride_h=1, stride_w=2, pad_h=1, pad_w=0, group=3, remove_center=False)]:
        input, offset, mask, params = make_case(
            2, 5, 4, cfg["kernel_h"], cfg["kernel_w"], cfg["stride_h"], cfg["stride_w"], cfg["pad_h"],
            cfg["pad_w"], 1, 1, cfg["group"], 3, 1.5, cfg["remove_center"], offset_range=1.3)
        inputs = tuple(t.requires_grad_() for t in (input, offset, mask))
        assert torch.autograd.gradcheck(lambda i, o, m: dcnv3(i, o, m, *params), inputs, eps=1e-6, atol=1e-6)
        inputs = inputs[:2] + (logits_like(mask, 3).requires_grad_(),)
        assert torch.autograd.gradcheck(lambda i, o, m: dcnv3(i, o, m, *params, softmax=True), inputs, eps=1e-6,
                                        atol=1e-6)


def test_opcheck():
    input, offset, mask, params = make_case(2, 5, 6, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False, dtype=torch.float32)
    for t in (input, offset, mask):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.ops_dcnv3.dcnv3_forward.default, (input, offset, mask) + params)
    torch.library.opcheck(torch.ops.ops_dcnv3.dcnv3_forward.default, (input, offset, mask) + params + (True,))
    grad_output = torch.randn(2, 5, 6, 8)
    torch.library.opcheck(torch.ops.ops_dcnv3.dcnv3_backward.default,
                          (grad_output, input.detach(), offset.detach(), mask.detach()) + params)


def test_torch_compile_fullgraph_module():
    torch.manual_seed(0)
    module = ops_dcnv3.DCNv3(channels=16, group=2)
    torch.nn.init.normal_(module.offset.weight, std=0.5)
    x = torch.randn(2, 6, 7, 16, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, module(x))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_half_types_close_to_float32(dtype, tol):
    input, offset, mask, params = make_case(2, 9, 10, 3, 3, 1, 1, 1, 1, 1, 1, 4, 16, 1.0, False, dtype=torch.float32)
    grad_output = torch.randn(2, 9, 10, 64).to(dtype)
    ref, _ = run_with_grads(dcnv3, input, offset, mask, params, grad_output.double())
    assert rel_err(dcnv3(*[t.to(dtype) for t in (input, offset, mask)], *params).float(), ref) < 2e-2
    # Quantise the inputs first so that the comparison measures the kernel's arithmetic
    # (the offset gradient jumps where a rounded location crosses a pixel boundary).
    quantised = [t.to(dtype) for t in (input, offset, mask)]
    expected, expected_grads = run_with_grads(dcnv3, *[t.float() for t in quantised], params, grad_output.double())
    out, grads = run_with_grads(dcnv3, *quantised, params, grad_output.double())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert rel_err(out.float(), expected) < tol
    for grad, expected_grad in zip(grads, expected_grads):
        assert rel_err(grad.float(), expected_grad) < tol


def test_batch_zero():
    input, offset, mask, params = make_case(1, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False)
    empty = [t[:0] for t in (input, offset, mask)]
    out, grads = run_with_grads(dcnv3, *empty, params, grad_output=torch.zeros(0, 5, 5, 8, dtype=torch.float64))
    assert out.shape == (0, 5, 5, 8)
    assert [g.shape for g in grads] == [t.shape for t in empty]


def test_non_contiguous_inputs():
    input, offset, mask, params = make_case(2, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False)
    # Same values, other memory layouts.
    input_nc = input.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    offset_nc = torch.cat([offset, offset], -1)[..., ::2]
    offset_nc.copy_(offset)
    mask_nc = mask.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (input_nc.is_contiguous() or offset_nc.is_contiguous() or mask_nc.is_contiguous())
    out, grads = run_with_grads(dcnv3, input_nc, offset_nc, mask_nc, params)
    ref, ref_grads = run_with_grads(dcnv3, input, offset, mask, params)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_offsets_and_masks_as_channel_slices_of_one_tensor(batch, dtype):
    """The module's packed inference path passes offsets and masks as slices of one matrix
    product's output; the CPU forward reads them in place (pixels further apart than their
    channels). Same results as contiguous copies, forward and backward."""
    input, offset, mask, params = make_case(batch, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, 2, 16, 1.0, False, dtype=dtype)
    mask = logits_like(mask, 3)
    both = torch.cat([offset, mask, torch.full_like(mask[..., :3], float("nan"))], -1)  # NaN padding: never read
    offset_view, mask_view = both[..., :offset.shape[-1]], both[..., offset.shape[-1]:offset.shape[-1] + mask.shape[-1]]
    assert not (offset_view.is_contiguous() or mask_view.is_contiguous())
    out, grads = run_with_grads(dcnv3, input, offset_view, mask_view, params + (True,))
    ref, ref_grads = run_with_grads(dcnv3, input, offset, mask, params + (True,))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    # a size-1 dimension of arbitrary stride (as views report them), and overlapping rows
    first = offset[:1].clone()
    odd = first.as_strided(first.shape, (12345,) + first.stride()[1:])
    torch.testing.assert_close(dcnv3(input[:1], odd, mask[:1], *params), dcnv3(input[:1], first, mask[:1], *params),
                               rtol=0, atol=0)
    overlapping = offset.reshape(-1)[: offset.numel()].as_strided(offset.shape, (0, 0, 1, 1))
    torch.testing.assert_close(dcnv3(input, overlapping, mask, *params),
                               dcnv3(input, overlapping.contiguous(), mask, *params), rtol=0, atol=0)


def test_far_offsets_contribute_nothing():
    rng = random.Random(0)
    for trial in range(30):
        cfg = random_configs(1, seed=rng.randint(0, 10**6))[0]
        input, offset, mask, params = make_case(**cfg)
        points = offset.shape[-1] // 2
        far = torch.rand(offset.shape[:-1] + (points,), generator=torch.Generator().manual_seed(trial)) < 0.3
        extreme = torch.tensor([1e30, -1e30, 1e300, -1e300, 1e6, -1e6], dtype=torch.float64)
        moved = offset.clone().reshape(*offset.shape[:-1], points, 2)
        choice = extreme[torch.randint(len(extreme), far.shape)]
        moved[..., trial % 2] = torch.where(far, choice, moved[..., trial % 2])
        moved = moved.reshape(offset.shape)
        out, (g_in, g_off, g_mask) = run_with_grads(dcnv3, input, moved, mask, params)
        assert torch.isfinite(out).all() and torch.isfinite(g_in).all()
        # Same as removing those points through the mask.
        expected, (e_in, _, _) = run_with_grads(dcnv3, input, offset, mask * ~far, params)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(g_in, e_in)
        assert (g_mask[far] == 0).all()
        assert (g_off.reshape(*far.shape, 2)[far] == 0).all()


@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_offset_gives_nan_in_its_pixel_and_group(dtype, bad, softmax):
    # Diverged offset weights must show up in the loss (as with the grid_sample
    # reference) instead of silently sampling nothing.
    group, group_channels, points = 3, 4, 9
    input, offset, mask, params = make_case(2, 6, 7, 3, 3, 1, 1, 1, 1, 1, 1, group, group_channels, 1.0, False,
                                            dtype=dtype)
    poisoned = offset.clone()
    poisoned[1, 2, 3, (1 * points + 5) * 2] = bad  # x of point 5, group 1
    poisoned[0, 4, 1, (2 * points + 0) * 2 + 1] = bad  # y of point 0, group 2
    nan_out = torch.zeros(input.shape[:3] + (group * group_channels,), dtype=torch.bool)
    nan_out[1, 2, 3, 4:8] = True
    nan_out[0, 4, 1, 8:12] = True
    params = params + (softmax,)
    out, grads = run_with_grads(dcnv3, input, poisoned, mask, params)
    ref, ref_grads = run_with_grads(dcnv3_reference, input, poisoned, mask, params)
    assert torch.equal(ref.isnan(), nan_out)
    assert torch.equal(out.isnan(), nan_out)
    torch.testing.assert_close(out[~nan_out], ref[~nan_out])
    nan_offset = torch.zeros(offset.shape, dtype=torch.bool)
    nan_offset[1, 2, 3, (1 * points + 5) * 2:][:2] = True
    nan_offset[0, 4, 1, (2 * points + 0) * 2:][:2] = True
    nan_mask = torch.zeros(mask.shape, dtype=torch.bool)
    if softmax:  # through the softmax, every point of the group
        nan_mask[1, 2, 3, 1 * points:2 * points] = True
        nan_mask[0, 4, 1, 2 * points:3 * points] = True
    else:
        nan_mask[1, 2, 3, 1 * points + 5] = True
        nan_mask[0, 4, 1, 2 * points + 0] = True
    for grad, ref_grad, expected, name in zip(grads, ref_grads, (torch.zeros_like(nan_out), nan_offset, nan_mask),
                                              ("input", "offset", "mask")):
        assert torch.equal(grad.isnan(), expected), name
        # grid_sample's gradient for a NaN x is NaN in y but 0 in x (and the other way
        # round): the kernels make both NaN.
        assert torch.equal(ref_grad.isnan() & ~expected, torch.zeros_like(expected)), name
        assert ref_grad.isnan().any() == expected.any(), name
        torch.testing.assert_close(grad[~expected], ref_grad[~expected], msg=name)


@pytest.mark.parametrize("softmax", [False, True])
def test_non_finite_grad_output_stays_in_its_pixel_and_group(softmax):
    # The CPU backward plans the points of 32 pixels at a time: a NaN or Inf in grad_output
    # must reach the gradients of its own (pixel, group) only, and grad_input where the
    # reference's has it.
    group, group_channels = 3, 4
    input, offset, mask, params = make_case(2, 6, 7, 3, 3, 1, 1, 1, 1, 1, 1, group, group_channels, 1.0, False,
                                            offset_range=4.0)
    grad_output = torch.randn(2, 6, 7, group * group_channels, dtype=torch.float64)
    grad_output[1, 2, 3, 5] = float("inf")  # group 1
    grad_output[0, 0, 0, 9] = float("nan")  # group 2
    params = params + (softmax,)
    _, grads = run_with_grads(dcnv3, input, offset, mask, params, grad_output)
    _, ref_grads = run_with_grads(dcnv3_reference, input, offset, mask, params, grad_output)
    assert torch.equal(grads[0].isnan(), ref_grads[0].isnan()) and grads[0].isnan().any()
    torch.testing.assert_close(grads[0][~grads[0].isnan()], ref_grads[0][~grads[0].isnan()])
    for grad, ref_grad in zip(grads[1:], ref_grads[1:]):
        poisoned = torch.zeros(grad.shape[:3] + (group, grad.shape[-1] // group), dtype=torch.bool)
        poisoned[1, 2, 3, 1] = poisoned[0, 0, 0, 2] = True
        poisoned = poisoned.reshape(grad.shape)
        assert grad[poisoned].isnan().any() and ref_grad[poisoned].isnan().any()
        torch.testing.assert_close(grad[~poisoned], ref_grad[~poisoned])


def test_module_with_nan_offset_scale_gives_nan():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 6, 16)
    for cls in (ops_dcnv3.DCNv3, ops_dcnv3.DCNv3_pytorch):
        module = cls(channels=16, group=2, offset_scale=float("nan"))
        out = module(x)
        assert out.isnan().all(), cls.__name__


def test_deterministic_and_thread_count_independent():
    input, offset, mask, params = make_case(1, 12, 11, 3, 3, 1, 1, 1, 1, 1, 1, 2, 8, 1.0, False, dtype=torch.float32,
                                            offset_range=3.0)
    threads = torch.get_num_threads()
    try:
        results = {}
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            results.setdefault(count, []).append(run_with_grads(dcnv3, input, offset, mask, params))
    finally:
        torch.set_num_threads(threads)
    (out_a, grads_a), (out_b, grads_b) = results[2]
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    out_1, grads_1 = results[1][0]
    torch.testing.assert_close(out_1, out_a)
    for a, b in zip(grads_1, grads_a):
        torch.testing.assert_close(a, b)


def test_cpu_backward_is_deterministic_even_under_use_deterministic_algorithms():
    # No atomics: grad_input is accumulated per (image, group) pair, or in band buffers
    # summed in a fixed order, so two runs agree bit for bit and the op does not report
    # itself as non-deterministic (the CUDA backward does: tests/test_dcnv3_cuda.py).
    input, offset, mask, params = make_case(2, 12, 11, 3, 3, 1, 1, 1, 1, 1, 1, 2, 8, 0.1, False, dtype=torch.float32,
                                            offset_range=30.0)
    params = params + (True,)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for count in (1, 64):  # 4 pairs: straight into grad_input at 1 thread, in bands at 64
            torch.set_num_threads(count)
            (out_a, grads_a), (out_b, grads_b) = [run_with_grads(dcnv3, input, offset, mask, params) for _ in range(2)]
            assert torch.equal(out_a, out_b), count
            assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b)), count
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_mask_gives_inf_like_the_reference(dtype):
    # Zero offsets put every point on a pixel centre, so three of its four corners have
    # bilinear weight 0. The output is m * sum_q(w_q v_q) as in the reference (and the
    # CUDA kernels): +-Inf. Folding m into the corner weights gave Inf * 0 = NaN.
    input, offset, mask, params = make_case(2, 6, 7, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False, dtype=dtype)
    offset = torch.zeros_like(offset)
    mask = mask.clone()
    mask[0, 2, 3, 4] = float("inf")  # centre point, group 0
    mask[1, 4, 5, 9 + 4] = -float("inf")  # centre point, group 1
    mask[1, 1, 1, 9 + 0] = float("inf")  # point (i, j) = (0, 0), group 1: pixel (0, 0)
    out = dcnv3(input, offset, mask, *params)
    ref = dcnv3_reference(input, offset, mask, *params)
    assert ref.isinf().sum() == 12 and not ref.isnan().any()
    torch.testing.assert_close(out, ref)


def backward_peak_bytes(args):
    """Peak of the memory that torch allocates during one dcnv3_backward call."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.ops.ops_dcnv3.dcnv3_backward(*args)
    events = sorted((event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"),
                    key=lambda event: event.start_ns())
    assert events, "the profiler recorded no allocations"
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("offset_range", [2.0, 64.0], ids=["near", "everywhere"])
def test_backward_memory_is_bounded_with_many_threads(offset_range):
    # One image and one group, so the threads share the pair's output rows. Each share used
    # to get a private grad_input buffer for the whole image: 257 MiB at 64 threads here.
    input, offset, mask, params = make_case(1, 64, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 64, 1.0, False,
                                            dtype=torch.float32, offset_range=offset_range)
    grad_output = torch.randn(input.shape, generator=torch.Generator().manual_seed(1))
    args = (grad_output, input, offset, mask) + params
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(64)
        peak = backward_peak_bytes(args)
        first = torch.ops.ops_dcnv3.dcnv3_backward(*args)
        second = torch.ops.ops_dcnv3.dcnv3_backward(*args)
        torch.set_num_threads(1)
        single = torch.ops.ops_dcnv3.dcnv3_backward(*args)
    finally:
        torch.set_num_threads(threads)
    # The gradients (1.4 MiB) and the band buffers, at most max(2 x the input, 32 MiB).
    assert peak < 40 * 2**20, f"{peak / 2**20:.1f} MiB"
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for a, b in zip(first, single):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
def test_backward_bands_match_reference_at_many_threads(softmax):
    # At 64 threads every pair is split into bands of output rows with their own buffers.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(64)
        for cfg in random_configs(10, seed=11):
            input, offset, mask, params = make_case(**cfg)
            assert_kernels_match_reference(input, offset, mask, params + (softmax,), cfg)
    finally:
        torch.set_num_threads(threads)


GOOD = dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1, dilation_w=1,
            group=2, group_channels=4, offset_scale=1.0, remove_center=False)


def call(input=None, offset=None, mask=None, fn=dcnv3, **overrides):
    base_input, base_offset, base_mask, _ = make_case(1, 5, 5, **GOOD)
    kwargs = dict(GOOD, **overrides)
    return fn(base_input if input is None else input, base_offset if offset is None else offset,
                 base_mask if mask is None else mask, *[kwargs[k] for k in PARAM_NAMES])


@pytest.mark.parametrize("kwargs,message", [
    (dict(input=torch.zeros(5, 5, 8, dtype=torch.float64)), "input must be 4-D"),
    (dict(input=torch.zeros(1, 5, 5, 6, dtype=torch.float64)), "group \\* group_channels = 2 \\* 4 = 8"),
    (dict(offset=torch.zeros(1, 5, 5, 35, dtype=torch.float64)), r"offset must have shape .*\[1, 5, 5, 36\]"),
    (dict(mask=torch.zeros(1, 4, 5, 18, dtype=torch.float64)), r"mask must have shape .*\[1, 5, 5, 18\]"),
    (dict(mask=torch.zeros(1, 5, 5, 18, dtype=torch.float32)), "same dtype"),
    (dict(mask=torch.zeros(1, 5, 5, 18, dtype=torch.float64, device="meta")), "same device"),
    (dict(kernel_h=2, kernel_w=2, remove_center=True), "remove_center needs an odd square kernel"),
    (dict(kernel_h=1, kernel_w=1, pad_h=0, pad_w=0, remove_center=True),
     "remove_center needs an odd square kernel larger than 1x1, got 1x1"),
    (dict(stride_h=0), "stride must be positive"),
    (dict(dilation_w=-1), "dilation must be positive"),
    (dict(pad_h=0, pad_w=0, kernel_h=7, kernel_w=7), "output size would be"),
])
def test_bad_input_errors(kwargs, message):
    # The kernels' checks (C++) answer for the functional; the reference and the fake kernel
    # check in torch._check form with the same words.
    with pytest.raises(RuntimeError, match=message):
        call(**kwargs)
    with pytest.raises(RuntimeError, match=message):
        call(fn=dcnv3_reference, **kwargs)


def test_compiled_op_checks_its_inputs_too():
    input, offset, mask, params = make_case(1, 5, 5, **GOOD)
    with pytest.raises(RuntimeError, match="offset must have shape"):
        torch.ops.ops_dcnv3.dcnv3_forward(input, offset[..., :-2], mask, *params)
    with pytest.raises(RuntimeError, match="group \\* group_channels"):
        torch.ops.ops_dcnv3.dcnv3_forward(input[..., :6], offset, mask, *params)


def test_module_under_cpu_bfloat16_autocast():
    torch.manual_seed(0)
    module = ops_dcnv3.DCNv3(channels=32, group=2)
    torch.nn.init.normal_(module.offset.weight, std=0.3)
    x = torch.randn(2, 7, 9, 32)
    expected = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), expected) < 3e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(x.requires_grad_()).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --- calls that crashed or passed with wrapped-around sizes ----------------------


def run_in_child(code, *args, timeout=600):
    """Runs Python `code` in a fresh interpreter that imports this same ops_dcnv3 (and
    inherits the environment, sanitizer settings included), so that a crash fails the
    calling test instead of killing pytest."""
    package_root = str(Path(ops_dcnv3.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=package_root, env=env, capture_output=True,
                          text=True, timeout=timeout)


CHILD_CALLS = r"""
import json, sys, torch
import ops_dcnv3
for case in json.loads(sys.argv[1]):
    input, offset, mask = (torch.zeros(case[name]) for name in ("input", "offset", "mask"))
    try:
        if case["call"] == "backward":
            grad_output = torch.zeros(case["input"][:1] + case["offset"][1:3] + case["input"][3:])
            torch.ops.ops_dcnv3.dcnv3_backward(grad_output, input, offset, mask, *case["args"])
        elif case["call"] == "forward":
            torch.ops.ops_dcnv3.dcnv3_forward(input, offset, mask, *case["args"])
        else:
            ops_dcnv3.dcnv3(input, offset, mask, *case["args"])
        result = "returned"
    except Exception as error:
        result = type(error).__name__ + ": " + str(error).splitlines()[0]
    print(json.dumps([case["name"], result]), flush=True)
"""


def op_args(kernel=(3, 3), stride=(1, 1), pad=(1, 1), dilation=(1, 1), group=1, group_channels=4,
            remove_center=False, softmax=False):
    return [*kernel, *stride, *pad, *dilation, group, group_channels, 1.0, remove_center, softmax]


# Each case gives the tensor shapes that the checks accepted before they checked overflow
# (products wrapped around in int64), so that without the check the kernels would run.
DIRECT_CALLS = [
    # P = 0 sampling points: with softmax the kernels read mask[0] of an empty mask.
    dict(name="remove_center_1x1_softmax_forward", call="forward", input=[1, 4, 4, 8], offset=[1, 4, 4, 0],
         mask=[1, 4, 4, 0], args=op_args((1, 1), pad=(0, 0), group=2, remove_center=True, softmax=True),
         error="RuntimeError", message="remove_center needs an odd square kernel larger than 1x1, got 1x1"),
    dict(name="remove_center_1x1_softmax_backward", call="backward", input=[1, 4, 4, 8], offset=[1, 4, 4, 0],
         mask=[1, 4, 4, 0], args=op_args((1, 1), pad=(0, 0), group=2, remove_center=True, softmax=True),
         error="RuntimeError", message="remove_center needs an odd square kernel larger than 1x1, got 1x1"),
    dict(name="remove_center_1x1_forward", call="forward", input=[1, 4, 4, 8], offset=[1, 4, 4, 0],
         mask=[1, 4, 4, 0], args=op_args((1, 1), pad=(0, 0), group=2, remove_center=True),
         error="RuntimeError", message="remove_center needs an odd square kernel larger than 1x1, got 1x1"),
    dict(name="remove_center_1x1_functional", call="dcnv3", input=[1, 4, 4, 8], offset=[1, 4, 4, 0],
         mask=[1, 4, 4, 0], args=op_args((1, 1), pad=(0, 0), group=2, remove_center=True, softmax=True),
         error="RuntimeError", message="remove_center needs an odd square kernel larger than 1x1, got 1x1"),
    # (2**60 + 1) * 16 wraps to 16 channels and 16 points per group: the kernels loop over 2**60 + 1 groups.
    dict(name="group_overflow_forward", call="forward", input=[1, 5, 5, 16], offset=[1, 6, 6, 32],
         mask=[1, 6, 6, 16], args=op_args((4, 4), pad=(2, 2), group=2**60 + 1, group_channels=16),
         error="RuntimeError", message=r"group \* group_channels = 1152921504606846977 \* 16 overflows"),
    dict(name="group_overflow_backward", call="backward", input=[1, 5, 5, 16], offset=[1, 6, 6, 32],
         mask=[1, 6, 6, 16], args=op_args((4, 4), pad=(2, 2), group=2**60 + 1, group_channels=16),
         error="RuntimeError", message=r"group \* group_channels = 1152921504606846977 \* 16 overflows"),
    # 2 * pad wraps to -2: a 3x3 output instead of an error.
    dict(name="pad_overflow", call="forward", input=[1, 5, 5, 4], offset=[1, 3, 3, 2], mask=[1, 3, 3, 1],
         args=op_args((1, 1), pad=(2**63 - 1, 2**63 - 1)), error="RuntimeError", message=r"2 \* pad_h .* overflows"),
    # dilation * (kernel - 1) wraps to -2: a 7x7 output.
    dict(name="dilation_overflow", call="forward", input=[1, 5, 5, 4], offset=[1, 7, 7, 18], mask=[1, 7, 7, 9],
         args=op_args(pad=(0, 0), dilation=(2**63 - 1, 2**63 - 1)), error="RuntimeError",
         message=r"dilation_h \* \(kernel_h - 1\) .* overflows"),
    dict(name="dilation_2_62", call="forward", input=[1, 5, 5, 4], offset=[1, 5, 5, 18], mask=[1, 5, 5, 9],
         args=op_args(dilation=(2**62, 2**62)), error="RuntimeError", message="overflows"),
    # kernel_h * kernel_w wraps to 0 points; an empty batch keeps the kernels from looping over them.
    dict(name="kernel_overflow", call="forward", input=[0, 5, 5, 4], offset=[0, 6, 6, 0], mask=[0, 6, 6, 0],
         args=op_args((2**62, 2**62), pad=(2**61, 2**61)), error="RuntimeError",
         message=r"kernel_h \* kernel_w = 4611686018427387904 \* 4611686018427387904 overflows"),
    dict(name="kernel_2_62", call="forward", input=[1, 5, 5, 4], offset=[1, 5, 5, 18], mask=[1, 5, 5, 9],
         args=op_args((2**62, 1)), error="RuntimeError", message="overflows"),
]


@pytest.fixture(scope="module")
def direct_call_results():
    """Outcome of each call of DIRECT_CALLS, made in child processes: one for all of them,
    and a new one for the rest after a call that crashed."""
    results, pending = {}, list(DIRECT_CALLS)
    while pending:
        child = run_in_child(CHILD_CALLS, json.dumps(pending))
        results.update(json.loads(line) for line in child.stdout.splitlines() if line.startswith("["))
        pending = [case for case in pending if case["name"] not in results]
        if pending and child.returncode == 0:
            raise RuntimeError(f"the child process skipped calls:\n{child.stderr[-4000:]}")
        if pending:
            results[pending.pop(0)["name"]] = f"crashed (exit code {child.returncode}):\n{child.stderr[-4000:]}"
    return results


@pytest.mark.parametrize("case", DIRECT_CALLS, ids=[case["name"] for case in DIRECT_CALLS])
def test_direct_op_call_rejects_bad_sizes(direct_call_results, case):
    result = direct_call_results[case["name"]]
    assert re.match(case["error"] + ": .*" + case["message"], result), result


def test_remove_center_with_1x1_kernel_is_rejected_in_python():
    input, offset, mask = torch.randn(1, 4, 4, 8), torch.zeros(1, 4, 4, 0), torch.zeros(1, 4, 4, 0)
    with pytest.raises(RuntimeError, match="remove_center needs an odd square kernel larger than 1x1, got 1x1"):
        dcnv3_reference(input, offset, mask, 1, 1, 1, 1, 0, 0, 1, 1, 2, 4, 1.0, True, softmax=True)
    with pytest.raises(ValueError, match="remove_center needs an odd kernel_size of at least 3, got 1"):
        ops_dcnv3.DCNv3(channels=8, kernel_size=1, pad=0, group=2, remove_center=True)


def test_group_channels_derived_from_the_input_and_backward_honours_needs_input_grad():
    input, offset, mask, params = make_case(1, 5, 5, **GOOD)
    full = dcnv3(input, offset, mask, *params)
    derived = dcnv3(input, offset, mask, *params[:9], None, *params[10:])
    assert torch.equal(full, derived)
    assert torch.equal(dcnv3_reference(input, offset, mask, *params[:9], None, *params[10:]),
                       dcnv3_reference(input, offset, mask, *params))
    offset = offset.clone().requires_grad_()
    dcnv3(input, offset, mask, *params).sum().backward()
    assert offset.grad is not None and input.grad is None and mask.grad is None
