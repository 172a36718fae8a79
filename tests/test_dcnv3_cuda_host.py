"""The CUDA kernels' own code, run on the CPU: tests/helpers/dcnv3_cuda_host.cpp (compiled
here by g++) runs the per-thread bodies of ops_dcnv3/csrc/cuda/dcnv3_cuda_threads.cuh, the
functions that dcnv3_cuda.cu's __global__ wrappers call, over an emulated launch grid:
threads one after another, atomics as plain adds, and the warp shuffles emulated (the
lanes of a warp run from 31 down to 0, and the lowest lane of each segment gets the sum
the xor shuffles would give it, in their order). Compared in float64 with the reference,
so the index arithmetic, sampling and gradient lines of the GPU path are checked without
a GPU. Not covered here: the wrappers' thread index, the real shuffles and atomics, the
launch configuration and the host code of dcnv3_cuda.cu (tests/test_dcnv3_cuda.py, on a
GPU)."""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import load

from ops_dcnv3 import dcnv3, dcnv3_reference

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from test_dcnv3_cuda import softmax_probe_error  # noqa: E402
from test_dcnv3_op import MODEL_CONFIGS, logits_like, make_case, random_configs, rel_err, run_with_grads  # noqa: E402

BIG_GRID = 132 * 32  # what dcnv3_cuda.cu allows on an H100/H200 (132 multiprocessors)


@pytest.fixture(scope="module")
def host():
    """torch.ops.dcnv3_cuda_host, built once into build/ (ninja rebuilds it when the harness
    or the kernels' header changes)."""
    build = REPO / "build" / "dcnv3_cuda_host"
    build.mkdir(parents=True, exist_ok=True)
    load(name="dcnv3_cuda_host", sources=[str(HERE / "helpers" / "dcnv3_cuda_host.cpp")],
         extra_include_paths=[str(REPO / "ops_dcnv3" / "csrc")], extra_cflags=["-O1"], build_directory=str(build),
         is_python_module=False)
    return torch.ops.dcnv3_cuda_host


def run_host(host, input, offset, mask, params, grad_output, max_blocks=BIG_GRID, allow_warp_reduce=True):
    """Output and gradients of the emulated CUDA kernels. params end with softmax."""
    out = host.forward(input, offset, mask, *params, max_blocks)
    grads = host.backward(grad_output, input, offset, mask, *params, max_blocks, allow_warp_reduce)
    return out, list(grads)


def case_with(cfg, softmax):
    input, offset, mask, params = make_case(**cfg)
    if softmax:
        mask = logits_like(mask, cfg["seed"])
    return input, offset, mask, params + (softmax,)


def assert_host_matches_reference(host, input, offset, mask, params, cfg, **launch):
    ref, ref_grads = run_with_grads(dcnv3_reference, input, offset, mask, params)
    grad_output = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, grads = run_host(host, input, offset, mask, params, grad_output.to(input.dtype), **launch)
    assert rel_err(out, ref) < 1e-10, cfg
    for grad, ref_grad, name in zip(grads, ref_grads, ("input", "offset", "mask")):
        assert rel_err(grad, ref_grad) < 1e-9, (name, cfg)


# Random shapes (group_channels 1, 3, 4, 6, 8, 17: shuffles and atomics; strides, dilation,
# padding, offset_scale 0.1), and the models' own (group_channels 16 and 32, remove_center).
CONFIGS = random_configs(24, seed=31) + MODEL_CONFIGS


@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['seed']}-cg{c['group_channels']}")
def test_emulated_cuda_kernels_match_reference_float64(host, cfg, softmax):
    input, offset, mask, params = case_with(cfg, softmax)
    assert_host_matches_reference(host, input, offset, mask, params, cfg)


@pytest.mark.parametrize("max_blocks", [1, 3], ids=["1-block", "3-blocks"])
@pytest.mark.parametrize("allow_warp_reduce", [True, False], ids=["shuffles", "atomics"])
@pytest.mark.parametrize("group_channels", [16, 32, 48])
def test_grid_stride_rounds_and_both_reductions(host, group_channels, allow_warp_reduce, max_blocks):
    # 2 x 9 x 8 x 96 = 13824 elements on 256 or 768 threads: many rounds of the grid-stride
    # loops, with a partly filled last round. 48 channels per group use atomics either way.
    cfg = dict(n=2, h=9, w=8, kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1,
               dilation_w=1, group=96 // group_channels, group_channels=group_channels, offset_scale=0.1,
               remove_center=True, offset_range=8.0, seed=group_channels)
    input, offset, mask, params = case_with(cfg, softmax=True)
    assert_host_matches_reference(host, input, offset, mask, params, cfg, max_blocks=max_blocks,
                                  allow_warp_reduce=allow_warp_reduce)


@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
def test_far_and_non_finite_offsets_like_the_cpu_kernels(host, softmax):
    # Far offsets sample nothing; a location that is not finite makes its (pixel, group)
    # output and its offset and mask gradients NaN (the CPU kernels' rule, checked against
    # the reference in test_dcnv3_op.py).
    input, offset, mask, params = make_case(2, 6, 7, 3, 3, 1, 1, 1, 1, 1, 1, 3, 4, 0.1, False)
    if softmax:
        mask = logits_like(mask, 5)
    params = params + (softmax,)
    offset = offset.clone()
    offset[0, 1, 1, 6] = 1e30
    offset[1, 0, 5, 41] = -1e300
    offset[1, 2, 3, 28] = float("nan")
    offset[0, 4, 1, 37] = float("inf")
    offset[1, 5, 0, 2] = -float("inf")
    expected, expected_grads = run_with_grads(dcnv3, input, offset, mask, params)
    assert expected.isnan().any()
    out, grads = run_host(host, input, offset, mask, params, torch.randn(expected.shape, dtype=torch.float64,
                                                                          generator=torch.Generator().manual_seed(1)))
    for got, want in zip([out] + grads, [expected] + expected_grads):
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got[~got.isnan()], want[~want.isnan()], rtol=1e-12, atol=1e-12)


def test_infinite_mask_gives_inf_like_the_reference(host):
    # Zero offsets put every point on a pixel centre: corners of zero bilinear weight.
    input, offset, mask, params = make_case(2, 6, 7, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False)
    offset = torch.zeros_like(offset)
    mask = mask.clone()
    mask[0, 2, 3, 4] = float("inf")
    mask[1, 4, 5, 9 + 4] = -float("inf")
    params = params + (False,)
    ref = dcnv3_reference(input, offset, mask, *params)
    out = host.forward(input, offset, mask, *params, BIG_GRID)
    assert ref.isinf().sum() == 8 and not ref.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
def test_float32_instantiation_close_to_cpu_kernels(host, softmax):
    cfg = MODEL_CONFIGS[0]
    input, offset, mask, params = case_with(dict(cfg, dtype=torch.float32), softmax)
    expected, expected_grads = run_with_grads(dcnv3, input, offset, mask, params)
    grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, grads = run_host(host, input, offset, mask, params, grad_output.float())
    assert out.dtype == torch.float32 and rel_err(out, expected) < 1e-6
    for grad, expected_grad in zip(grads, expected_grads):
        assert rel_err(grad, expected_grad) < 1e-5


def test_float32_softmax_weights_within_a_few_ulp(host):
    # The float32 softmax lines with IEEE exp and division (the device build has no
    # --use_fast_math): each weight within 1e-6 of float64, as on the CPU.
    assert softmax_probe_error(lambda *args: host.forward(*args, BIG_GRID)) < 1e-6
