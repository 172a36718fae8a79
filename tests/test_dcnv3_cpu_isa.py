"""The copies of the CPU kernels compiled per instruction set (baseline, AVX2, AVX-512), each
forced in turn with ``ops_dcnv3.set_cpu_isa`` and checked against the reference; the 16-bit
paths (bfloat16 channel pairs and widening, float32 accumulation; float16 through the float32
kernels); ``DCNV3_CPU_ISA``.

Every copy that this CPU can run is tested; the others are skipped with the reason."""
import os
import subprocess
import sys

import pytest
import torch

import ops_dcnv3
from ops_dcnv3 import dcnv3, dcnv3_reference

sys.path.insert(0, os.path.dirname(__file__))
from test_dcnv3_cuda import softmax_probe  # noqa: E402
from test_dcnv3_op import MODEL_CONFIGS, logits_like, make_case, random_configs, rel_err, run_with_grads  # noqa: E402

ISAS = ["baseline", "avx2", "avx512"]


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param not in ops_dcnv3.supported_cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels ({ops_dcnv3.supported_cpu_isas()})")
    previous = ops_dcnv3.set_cpu_isa(request.param)
    assert ops_dcnv3.cpu_isa() == request.param
    yield request.param
    ops_dcnv3.set_cpu_isa(previous)


def test_isa_api():
    supported = ops_dcnv3.supported_cpu_isas()
    assert supported[0] == "baseline" and set(supported) <= set(ISAS)
    previous = ops_dcnv3.set_cpu_isa("baseline")
    try:
        assert ops_dcnv3.cpu_isa() == "baseline"
        assert ops_dcnv3.set_cpu_isa("auto") == "baseline"
        # auto: AVX2 wherever the CPU has it (AVX-512 CPUs included), else the baseline.
        assert ops_dcnv3.cpu_isa() == ("avx2" if "avx2" in supported else "baseline")
        with pytest.raises(RuntimeError, match="must be auto, baseline, avx2 or avx512, got 'sse9'"):
            ops_dcnv3.set_cpu_isa("sse9")
        for name in set(ISAS) - set(supported):
            with pytest.raises(RuntimeError, match=f"this CPU cannot run the {name} kernels"):
                ops_dcnv3.set_cpu_isa(name)
    finally:
        ops_dcnv3.set_cpu_isa(previous)


def run_isa_probe(value):
    code = ("import torch, ops_dcnv3\n"
            "x = torch.randn(1, 4, 4, 16)\n"
            "try:\n"
            "    ops_dcnv3.dcnv3(x, torch.zeros(1, 4, 4, 18), torch.ones(1, 4, 4, 9), 3, 3, 1, 1, 1, 1, 1, 1, 1, 16,"
            " 1.0, False)\n"
            "    print('ran', ops_dcnv3.cpu_isa())\n"
            "except RuntimeError as e:\n"
            "    print('error', str(e).splitlines()[0])\n")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DCNV3_CPU_ISA=value),
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_environment_variable_forces_a_copy_or_fails_clearly():
    supported = ops_dcnv3.supported_cpu_isas()
    assert run_isa_probe("baseline") == "ran baseline"
    assert run_isa_probe("auto") == f"ran {'avx2' if 'avx2' in supported else 'baseline'}"
    assert "DCNV3_CPU_ISA must be auto, baseline, avx2 or avx512, got 'fast'" in run_isa_probe("fast")
    missing = [name for name in ISAS if name not in supported]
    if missing:  # an error at the first call, not an illegal instruction
        assert f"DCNV3_CPU_ISA={missing[-1]}: this CPU cannot run" in run_isa_probe(missing[-1])


@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
@pytest.mark.parametrize("cfg", random_configs(8, seed=77) + MODEL_CONFIGS, ids=lambda c: str(c["seed"]))
def test_float64_matches_reference(isa, cfg, softmax):
    input, offset, mask, params = make_case(**cfg)
    if softmax:
        mask = logits_like(mask, cfg["seed"])
    params = params + (softmax,)
    out, grads = run_with_grads(dcnv3, input, offset, mask, params)
    ref_out, ref_grads = run_with_grads(dcnv3_reference, input, offset, mask, params)
    assert rel_err(out, ref_out) < 1e-10
    for grad, ref in zip(grads, ref_grads):
        assert rel_err(grad, ref) < 1e-9


# float32 through the fixed channel counts (16, 32: unrolled) and any other (3, 6).
FLOAT32_CASES = MODEL_CONFIGS + [dict(MODEL_CONFIGS[0], group_channels=3, seed=3),
                                 dict(MODEL_CONFIGS[1], group_channels=6, seed=6)]


@pytest.mark.parametrize("cfg", FLOAT32_CASES, ids=lambda c: f"{c['group_channels']}ch-{c['seed']}")
def test_float32_matches_reference(isa, cfg):
    input, offset, mask, params = make_case(**cfg)
    mask = logits_like(mask, cfg["seed"])
    single = [t.float() for t in (input, offset, mask)]
    out, grads = run_with_grads(dcnv3, *single, params + (True,))
    ref_out, ref_grads = run_with_grads(dcnv3_reference, *[t.double() for t in single], params + (True,))
    assert rel_err(out.double(), ref_out) < 1e-5
    for grad, ref in zip(grads, ref_grads):
        assert rel_err(grad.double(), ref) < 1e-4


# 16-bit inputs against the float32 kernels on the same (rounded) values: the float32
# accumulation leaves only the rounding of the results. group_channels 16 and 32 take the
# bfloat16 channel-pair loops, 6 the pairs without unrolling, 3 the plain widening loop; a
# batch of 8 images gives enough (image, group) pairs for the per-pair float32 buffer of
# the backward, a batch of 1 the banded buffers. float16 is computed by the float32 kernels
# on the widened values: its results are theirs rounded, bit for bit.
HALF_CASES = [(16, 8), (16, 1), (32, 8), (32, 1), (6, 8), (3, 1)]


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("group_channels,batch", HALF_CASES, ids=lambda v: str(v))
def test_16_bit_types_match_float32_on_the_same_values(isa, dtype, tol, group_channels, batch):
    torch.set_num_threads(2)  # the band/pair split depends on the thread count
    input, offset, mask, params = make_case(batch, 9, 10, 3, 3, 1, 1, 1, 1, 1, 1, 3, group_channels, 1.0, False,
                                            dtype=torch.float32, seed=group_channels)
    mask = logits_like(mask, group_channels)
    quantised = [t.to(dtype) for t in (input, offset, mask)]
    grad_output = torch.randn(batch, 9, 10, 3 * group_channels, generator=torch.Generator().manual_seed(5))
    grad_output = grad_output.to(dtype)
    expected, expected_grads = run_with_grads(dcnv3, *[t.float() for t in quantised], params + (True,),
                                              grad_output.float())
    out, grads = run_with_grads(dcnv3, *quantised, params + (True,), grad_output)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert rel_err(out.float(), expected) < tol
    for grad, expected_grad, name in zip(grads, expected_grads, ("input", "offset", "mask")):
        assert rel_err(grad.float(), expected_grad) < tol, name
    if dtype == torch.float16:
        for value, expected_value in zip([out, *grads], [expected, *expected_grads]):
            torch.testing.assert_close(value, expected_value.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("channels", [16, 2, 1])
def test_every_16_bit_value_passes_through_exactly(isa, dtype, channels):
    """A 1x1 kernel on 1x1 images with weight 1 copies its input: all 65536 bit patterns
    (subnormals, +-Inf, NaN) must come out unchanged, forward and backward, which checks the
    widening and the rounding of every path (channel pairs, fixed and any channel count)."""
    values = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    images = values.reshape(-1, 1, 1, channels)
    n = images.shape[0]
    offset = torch.zeros(n, 1, 1, 2, dtype=dtype)
    mask = torch.ones(n, 1, 1, 1, dtype=dtype)
    x = images.clone().requires_grad_()
    out = dcnv3(x, offset, mask, 1, 1, 1, 1, 0, 0, 1, 1, 1, channels, 1.0, False)
    torch.testing.assert_close(out, images, rtol=0, atol=0, equal_nan=True)
    out.backward(images)
    torch.testing.assert_close(x.grad, images, rtol=0, atol=0, equal_nan=True)


def test_non_finite_offsets_and_masks_in_bfloat16(isa):
    """The channel-pair loops keep the rules for non-finite values: a NaN offset makes its
    pixel and group NaN, an infinite mask weight gives +-Inf (SPEC section 3)."""
    input, offset, mask, params = make_case(1, 5, 6, 3, 3, 1, 1, 1, 1, 1, 1, 2, 16, 1.0, False,
                                            dtype=torch.float32)
    offset[0, 2, 3, 0] = float("nan")
    mask[0, 1, 1, 9 + 4] = float("inf")
    for dtype in (torch.bfloat16, torch.float32):
        out = dcnv3(*[t.to(dtype) for t in (input, offset, mask)], *params)
        expected = dcnv3_reference(*[t.to(dtype).double() for t in (input, offset, mask)], *params)
        assert torch.isnan(out[0, 2, 3, :16]).all() and not torch.isnan(out[0, 2, 3, 16:]).any()
        assert torch.equal(torch.isinf(out[0, 1, 1]), torch.isinf(expected[0, 1, 1]))
        finite = torch.isfinite(expected)
        assert rel_err(out.double()[finite], expected[finite]) < 1e-2


def test_float32_softmax_exps_over_their_whole_range(isa):
    """The kernels' float32 exp (a polynomial, vectorised) against float64 for logit - max
    from 0 down to -110: within 1e-6 relative, and below -87.3, where it gives 0 instead of
    a subnormal, within 1.2e-38 absolute. The probe reads one softmax weight per element."""
    (input, offset, logits), params, _ = softmax_probe()
    gen = torch.Generator().manual_seed(3)
    logits = torch.rand(logits.shape, generator=gen) * -110
    logits[..., ::9] = 0  # each group's maximum: the other points' logits are logit - max
    out = dcnv3(input, offset, logits, *params).double()
    point = 3 * ((2 - torch.arange(out.shape[2])) % 3)[None, :] + ((2 - torch.arange(out.shape[1])) % 3)[:, None]
    weights = logits.double().reshape(*logits.shape[:3], -1, 9).softmax(-1)
    expected = weights.gather(-1, point[None, :, :, None, None].expand(*weights.shape[:4], 1))
    expected = expected.squeeze(-1).repeat_interleave(out.shape[-1] // weights.shape[3], -1)
    normal = expected > 1.2e-38
    assert normal.float().mean() > 0.5 and (~normal).any()
    assert ((out - expected).abs() / expected)[normal].max() < 1e-6
    assert (out - expected).abs()[~normal].max() <= 1.2e-38


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
def test_the_two_forward_paths_agree(isa, dtype, softmax):
    """The forward works out the sampling points of a pixel in vectorised loops, and a pixel
    with a non-finite location or weight point by point (forward_pixel_exact). A NaN offset
    in group 0 (and, without softmax, an infinite mask weight in group 1) sends one pixel
    down the second path: every other pixel keeps its bits, and the pixel's finite groups
    their values up to the rounding of the multiply-adds (the compiler may fuse a * b + c * d
    either way round in the two loops)."""
    input, offset, mask, params = make_case(2, 7, 8, 3, 3, 1, 1, 1, 1, 1, 1, 3, 16, 1.0, False,
                                            dtype=torch.float32, offset_range=3.0, seed=11)
    if softmax:
        mask = logits_like(mask, 11)
    tensors = [t.to(dtype) for t in (input, offset, mask)]
    before = dcnv3(*tensors, *params, softmax)
    offset, mask = tensors[1].clone(), tensors[2].clone()
    offset[1, 3, 4, 5] = float("nan")
    if not softmax:
        mask[1, 3, 4, 9 + 2] = float("inf")
    after = dcnv3(tensors[0], offset, mask, *params, softmax)
    assert torch.isnan(after[1, 3, 4, :16]).all()
    changed = torch.zeros(after.shape[:3], dtype=torch.bool)
    changed[1, 3, 4] = True
    assert torch.equal(after[~changed], before[~changed])
    finite = slice(16, None) if softmax else slice(32, None)
    tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2**-8}[dtype]
    torch.testing.assert_close(after[1, 3, 4, finite], before[1, 3, 4, finite], rtol=tol, atol=tol)
    if not softmax:
        assert torch.isinf(after[1, 3, 4, 16:32]).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_non_finite_input_values_reach_only_the_outputs_that_read_them(isa, dtype):
    """+-Inf and NaN pixels of the input, on the border and inside: an output channel is NaN or
    +-Inf exactly where the reference's is (a corner outside the image adds nothing, also
    when the kernels read a pixel inside for it with weight 0), the others are unchanged."""
    input, offset, mask, params = make_case(2, 6, 7, 3, 3, 1, 1, 1, 1, 1, 1, 2, 16, 1.0, False,
                                            dtype=torch.float32, offset_range=2.5, seed=4)
    input[0, 0, :, 3] = float("inf")  # the top row, one channel of group 0
    input[0, :, -1, 20] = float("-inf")  # the right column, one channel of group 1
    input[1, 5, 0, :] = float("nan")  # a corner pixel, every channel
    input[1, 2, 3, 7] = float("nan")  # inside the image
    tensors = [t.to(dtype) for t in (input, offset, mask)]
    out = dcnv3(*tensors, *params).double()
    expected = dcnv3_reference(*[t.double() for t in tensors], *params)
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(test(out), test(expected)), test.__name__
    finite = torch.isfinite(expected)
    assert (~finite).any() and finite.float().mean() > 0.5
    assert rel_err(out[finite], expected[finite]) < {torch.bfloat16: 1e-2}.get(dtype, 1e-5)
    clean = dcnv3(*[t.to(dtype) for t in (torch.randn_like(input), offset, mask)], *params)
    assert torch.isfinite(clean).all()
