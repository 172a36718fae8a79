"""CUDA kernels of DCNv3: they compile wherever nvcc is present (no GPU needed), and where
a GPU is visible they agree with the CPU kernels and the reference."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ops_dcnv3
from ops_dcnv3 import dcnv3, dcnv3_reference

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_dcnv3_op import (  # noqa: E402
    MODEL_CONFIGS,
    logits_like,
    make_case,
    random_configs,
    rel_err,
    run_in_child,
    run_with_grads,
)

HAS_NVCC = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")
HAS_CUDA_OP = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "ops_dcnv3::dcnv3_forward", "CUDA")
needs_gpu = pytest.mark.skipif(not HAS_CUDA_OP, reason="needs a GPU and ops_dcnv3 built with CUDA")


@pytest.mark.skipif(not HAS_NVCC, reason="needs the CUDA toolkit (nvcc)")
def test_cuda_sources_compile():
    result = subprocess.run([sys.executable, "tools/check_cuda_build.py"], cwd=REPO, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "compiled ops_dcnv3/csrc/cuda/dcnv3_cuda.cu" in result.stdout


@pytest.fixture(autouse=True)
def _cuda_kernels_only():
    """These tests are about the C++/CUDA kernels: ``dcnv3`` must not fall back to another
    backend (the dispatcher's self-check would, quietly, if the kernels were wrong)."""
    ops_dcnv3.set_backend("cuda")
    previous = os.environ.get("DCNV3_SELF_CHECK")
    os.environ["DCNV3_SELF_CHECK"] = "0"
    yield
    ops_dcnv3.set_backend(None)
    if previous is None:
        os.environ.pop("DCNV3_SELF_CHECK")
    else:
        os.environ["DCNV3_SELF_CHECK"] = previous


def to_cuda(*tensors):
    return [t.cuda() for t in tensors]


@needs_gpu
@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
@pytest.mark.parametrize("cfg", random_configs(20, seed=7) + MODEL_CONFIGS,
                         ids=lambda c: f"{c['seed']}-cg{c['group_channels']}")
def test_cuda_matches_reference_float64(cfg, softmax):
    input, offset, mask, params = make_case(**cfg)
    if softmax:
        mask = logits_like(mask, cfg["seed"])
    params = params + (softmax,)
    out, grads = run_with_grads(dcnv3, *to_cuda(input, offset, mask), params)
    ref, ref_grads = run_with_grads(dcnv3_reference, input, offset, mask, params)
    assert out.is_cuda and all(grad.is_cuda for grad in grads)
    assert rel_err(out.cpu(), ref) < 1e-10, cfg
    for grad, ref_grad, name in zip(grads, ref_grads, ("input", "offset", "mask")):
        assert rel_err(grad.cpu(), ref_grad) < 1e-9, (name, cfg)


@needs_gpu
@pytest.mark.parametrize("offset_scale", [1.0, 0.1])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
def test_cuda_agrees_with_cpu_kernels(dtype, tol, offset_scale):
    input, offset, mask, params = make_case(2, 14, 13, 3, 3, 1, 1, 1, 1, 1, 1, 4, 16, offset_scale, False, dtype=dtype,
                                            offset_range=2.0 / offset_scale)
    grad_output = torch.randn(2, 14, 13, 64, dtype=torch.float64).to(dtype)
    out, grads = run_with_grads(dcnv3, *to_cuda(input, offset, mask), params, grad_output.cuda())
    cpu_out, cpu_grads = run_with_grads(dcnv3, input, offset, mask, params, grad_output)
    assert rel_err(out.cpu().double(), cpu_out.double()) < tol
    for grad, cpu_grad in zip(grads, cpu_grads):
        assert rel_err(grad.cpu().double(), cpu_grad.double()) < tol


@needs_gpu
def test_cuda_gradcheck_and_opcheck():
    input, offset, mask, params = make_case(2, 5, 4, 3, 3, 2, 1, 0, 2, 1, 1, 2, 3, 1.5, True, offset_range=1.3)
    inputs = tuple(t.cuda().requires_grad_() for t in (input, offset, mask))
    assert torch.autograd.gradcheck(lambda i, o, m: dcnv3(i, o, m, *params), inputs, eps=1e-6, atol=1e-6)
    logits = inputs[:2] + (logits_like(mask, 3).cuda().requires_grad_(),)
    assert torch.autograd.gradcheck(lambda i, o, m: dcnv3(i, o, m, *params, softmax=True), logits, eps=1e-6,
                                    atol=1e-6)
    torch.library.opcheck(torch.ops.ops_dcnv3.dcnv3_forward.default,
                          tuple(t.detach().float().requires_grad_() for t in inputs) + params)


@needs_gpu
@pytest.mark.parametrize("group_channels", [16, 32])
def test_cuda_gradcheck_softmax_model_shapes(group_channels):
    # The models' path: fused softmax over non-uniform logits, remove_center, 16 or 32
    # channels per group (one shuffle segment of half or all of a warp), offset_scale 0.1.
    input, offset, mask, params = make_case(1, 4, 5, 3, 3, 1, 1, 1, 1, 1, 1, 2, group_channels, 0.1, True,
                                            offset_range=10.0, seed=group_channels)
    inputs = tuple(t.cuda().requires_grad_() for t in (input, offset, logits_like(mask, group_channels)))
    assert torch.autograd.gradcheck(lambda i, o, m: dcnv3(i, o, m, *params, softmax=True), inputs, eps=1e-6,
                                    atol=1e-6)


@needs_gpu
def test_cuda_backward_reports_that_it_is_not_deterministic():
    # Its atomics add in a different order on every run (the CPU backward is deterministic).
    input, offset, mask, params = make_case(1, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False)
    tensors = to_cuda(input, offset, mask)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        dcnv3(*tensors, *params)  # the forward has no atomics
        with pytest.raises(RuntimeError, match="dcnv3_backward_cuda does not have a deterministic implementation"):
            run_with_grads(dcnv3, *tensors, params)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def softmax_probe():
    """float32 inputs whose dcnv3 output, with softmax, is one softmax weight per element,
    and those weights in float64. Zero offsets put each point of a 3x3 kernel on a pixel,
    and the input is 1 on every third row and column and 0 elsewhere, so output pixel
    (ho, wo) sees exactly one 1, through point k = 3 i + j with i = (2 - wo) % 3 and
    j = (2 - ho) % 3. The logits are integers spread over about 40: logit - max is exact,
    and its exp within 2 ulp with expf, but up to ~50 ulp off with --use_fast_math's
    __expf (2 + 1.16 |x| ulp)."""
    n, h, w, group, group_channels = 2, 12, 9, 2, 4
    input = torch.zeros(n, h, w, group * group_channels)
    input[:, 1::3, 1::3] = 1
    offset = torch.zeros(n, h, w, group * 9 * 2)
    logits = logits_like(torch.zeros(n, h, w, group * 9), seed=9, scale=6.0).round()
    point = 3 * ((2 - torch.arange(w)) % 3)[None, :] + ((2 - torch.arange(h)) % 3)[:, None]
    weights = logits.double().reshape(n, h, w, group, 9).softmax(-1)
    expected = weights.gather(-1, point[None, :, :, None, None].expand(n, h, w, group, 1))
    params = (3, 3, 1, 1, 1, 1, 1, 1, group, group_channels, 1.0, False, True)
    return (input, offset, logits), params, expected.squeeze(-1).repeat_interleave(group_channels, -1)


def softmax_probe_error(fn, device="cpu"):
    """Largest relative error of the float32 softmax weights that fn computes."""
    tensors, params, expected = softmax_probe()
    out = fn(*(t.to(device) for t in tensors), *params).cpu()
    return ((out.double() - expected).abs() / expected).max().item()


def test_float32_softmax_weights_on_cpu_within_a_few_ulp():
    # The probe of the GPU test below, on the CPU kernels (std::exp, IEEE division).
    assert softmax_probe_error(dcnv3) < 1e-6


@needs_gpu
def test_cuda_float32_softmax_weights_within_a_few_ulp():
    # Built without --use_fast_math: expf within 2 ulp and IEEE division, so each weight is
    # within a few ulp of the float64 value, like the CPU's.
    assert softmax_probe_error(dcnv3, "cuda") < 1e-6


@needs_gpu
def test_cuda_module_matches_cpu_module():
    torch.manual_seed(0)
    module = ops_dcnv3.DCNv3(channels=64, group=4).double()
    torch.nn.init.normal_(module.offset.weight, std=0.3)
    x = torch.randn(2, 9, 11, 64, dtype=torch.float64)
    expected = module(x)
    torch.testing.assert_close(module.cuda()(x.cuda()).cpu(), expected)


@needs_gpu
@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
def test_cuda_non_finite_offset_gives_nan_like_cpu(softmax):
    input, offset, mask, params = make_case(2, 6, 7, 3, 3, 1, 1, 1, 1, 1, 1, 3, 4, 1.0, False)
    offset = offset.clone()
    offset[1, 2, 3, 28] = float("nan")  # x of point 5, group 1
    offset[0, 4, 1, 37] = float("inf")  # y of point 0, group 2
    params = params + (softmax,)
    out, grads = run_with_grads(dcnv3, *to_cuda(input, offset, mask), params)
    cpu_out, cpu_grads = run_with_grads(dcnv3, input, offset, mask, params)
    assert cpu_out.isnan().any()
    for got, expected in zip([out] + grads, [cpu_out] + cpu_grads):
        got = got.cpu()
        assert torch.equal(got.isnan(), expected.isnan())
        torch.testing.assert_close(got[~got.isnan()], expected[~expected.isnan()])


@needs_gpu
def test_cuda_rejects_sizes_beyond_int32():
    # pad_h = stride_h = 2**31 give a 3x3 output, but H + 2 * pad_h is beyond the kernels' int.
    input, offset, mask = torch.zeros(1, 5, 5, 4), torch.zeros(1, 3, 3, 18), torch.zeros(1, 3, 3, 9)
    with pytest.raises(RuntimeError, match="too large for the CUDA kernels"):
        torch.ops.ops_dcnv3.dcnv3_forward(*to_cuda(input, offset, mask), 3, 3, 2**31, 1, 2**31, 0, 1, 1, 1, 4, 1.0,
                                          False)


@needs_gpu
def test_cuda_rejects_remove_center_with_1x1_kernel():
    # In a child process: before the check, softmax read mask[0] of an empty mask.
    child = run_in_child("""
import torch, ops_dcnv3
input, offset, mask = torch.randn(1, 4, 4, 8).cuda(), torch.zeros(1, 4, 4, 0).cuda(), torch.zeros(1, 4, 4, 0).cuda()
try:
    torch.ops.ops_dcnv3.dcnv3_forward(input, offset, mask, 1, 1, 1, 1, 0, 0, 1, 1, 2, 4, 1.0, True, True)
    torch.cuda.synchronize()
    print("returned")
except RuntimeError as error:
    print(str(error).splitlines()[0])
""")
    assert child.returncode == 0, child.stderr[-4000:]
    assert "remove_center needs an odd square kernel larger than 1x1, got 1x1" in child.stdout
