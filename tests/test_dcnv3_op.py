"""The DCNv3 operator: parity with the official fixtures and the reference, gradients,
registration (opcheck, torch.compile), dtypes, threads and bad input."""
import random
from pathlib import Path

import pytest
import torch

import ops_dcnv3
from ops_dcnv3 import dcnv3, dcnv3_output_size, dcnv3_reference

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official"
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
    tensors = [t.detach().clone().requires_grad_() for t in (input, offset, mask)]
    out = fn(*tensors, *params)
    if grad_output is None:
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_output.to(out.dtype))
    return out.detach(), [t.grad for t in tensors]


@pytest.fixture(scope="module")
def official_cases():
    path = FIXTURES / "dcnv3_op_cases.pt"
    if not path.exists():
        pytest.skip(f"official fixtures not found at {path}")
    return torch.load(path, weights_only=True)


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
                   group_channels=rng.choice([1, 3, 4, 6, 8, 17]), offset_scale=rng.choice([0.5, 1.0, 2.0]),
                   remove_center=remove_center, offset_range=rng.choice([0.5, 2.0, 8.0]), seed=rng.randint(0, 10**6))
        ho, wo = dcnv3_output_size(cfg["h"], cfg["w"], kernel_h, kernel_w, cfg["stride_h"], cfg["stride_w"],
                                   cfg["pad_h"], cfg["pad_w"], cfg["dilation_h"], cfg["dilation_w"])
        if ho > 0 and wo > 0:
            configs.append(cfg)
    return configs


@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
@pytest.mark.parametrize("cfg", random_configs(40, seed=random.randrange(10**6)), ids=lambda c: str(c["seed"]))
def test_matches_reference_on_random_cases(cfg, softmax):
    input, offset, mask, params = make_case(**cfg)
    if softmax:  # logits of any scale
        mask = torch.randn(mask.shape, dtype=mask.dtype, generator=torch.Generator().manual_seed(cfg["seed"])) * 3
    params = params + (softmax,)
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


def test_non_finite_and_far_offsets_contribute_nothing():
    rng = random.Random(0)
    for trial in range(30):
        cfg = random_configs(1, seed=rng.randint(0, 10**6))[0]
        input, offset, mask, params = make_case(**cfg)
        points = offset.shape[-1] // 2
        bad = torch.rand(offset.shape[:-1] + (points,), generator=torch.Generator().manual_seed(trial)) < 0.3
        extreme = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e300])
        poisoned = offset.clone().reshape(*offset.shape[:-1], points, 2)
        choice = extreme[torch.randint(len(extreme), bad.shape)]
        poisoned[..., 0] = torch.where(bad, choice, poisoned[..., 0])
        poisoned = poisoned.reshape(offset.shape)
        out, (g_in, g_off, g_mask) = run_with_grads(dcnv3, input, poisoned, mask, params)
        assert torch.isfinite(out).all() and torch.isfinite(g_in).all()
        # Same as removing those points through the mask.
        expected, (e_in, _, _) = run_with_grads(dcnv3, input, offset, mask * ~bad, params)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(g_in, e_in)
        assert (g_mask[bad] == 0).all()
        assert (g_off.reshape(*bad.shape, 2)[bad] == 0).all()


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


GOOD = dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1, dilation_w=1,
            group=2, group_channels=4, offset_scale=1.0, remove_center=False)


def call(input=None, offset=None, mask=None, **overrides):
    base_input, base_offset, base_mask, _ = make_case(1, 5, 5, **GOOD)
    kwargs = dict(GOOD, **overrides)
    return dcnv3(base_input if input is None else input, base_offset if offset is None else offset,
                 base_mask if mask is None else mask, *[kwargs[k] for k in PARAM_NAMES])


@pytest.mark.parametrize("kwargs,message", [
    (dict(input=torch.zeros(5, 5, 8, dtype=torch.float64)), "input must be 4-D"),
    (dict(input=torch.zeros(1, 5, 5, 6, dtype=torch.float64)), "group \\* group_channels = 2 \\* 4 = 8"),
    (dict(offset=torch.zeros(1, 5, 5, 35, dtype=torch.float64)), r"offset must have shape .*\(1, 5, 5, 36\)"),
    (dict(mask=torch.zeros(1, 4, 5, 18, dtype=torch.float64)), r"mask must have shape .*\(1, 5, 5, 18\)"),
    (dict(mask=torch.zeros(1, 5, 5, 18, dtype=torch.float32)), "same dtype"),
    (dict(mask=torch.zeros(1, 5, 5, 18, dtype=torch.float64, device="meta")), "same device"),
    (dict(kernel_h=2, kernel_w=2, remove_center=True), "remove_center needs an odd square kernel"),
    (dict(stride_h=0), "stride must be positive"),
    (dict(dilation_w=-1), "dilation must be positive"),
    (dict(pad_h=0, pad_w=0, kernel_h=7, kernel_w=7), "output size would be"),
])
def test_bad_input_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        call(**kwargs)


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
