"""The Triton DCNv3 kernels (ops_dcnv3.triton_ops) against the official fixtures and the reference.

One file for both places the kernels run: without a GPU, tests/conftest.py turns on Triton's
interpreter and every test runs on CPU tensors (small shapes: the interpreter executes each
program in Python); with a GPU (and the interpreter off) the same tests run the compiled
kernels on CUDA tensors, which is what tools/gpu_acceptance.sh does. The reference runs on
the CPU in float64 either way.
"""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from ops_dcnv3 import dcnv3, dcnv3_output_size, dcnv3_reference  # noqa: E402
from ops_dcnv3.triton_ops import INTERPRETED, dcnv3_triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_dcnv3_op import FIXTURES, PARAM_NAMES, make_case, rel_err, run_with_grads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = [
    pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                       reason="compiled Triton kernels need a GPU; without one, run with TRITON_INTERPRET=1 set "
                              "before triton is imported (tests/conftest.py does this when no GPU is visible)"),
    # The interpreter computes with numpy, which warns about the NaN and Inf of the non-finite cases.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def triton_on_device(input, offset, mask, *params, **kwargs):
    """dcnv3_triton on DEVICE, results back on the CPU (gradients flow through the copies)."""
    return dcnv3_triton(input.to(DEVICE), offset.to(DEVICE), mask.to(DEVICE), *params, **kwargs).cpu()


def compare(input, offset, mask, params, dtype, out_tol, grad_tol, softmax=False):
    """Triton in ``dtype`` against the float64 reference on the same (rounded) inputs."""
    tensors = [t.to(dtype) for t in (input, offset, mask)]
    out, grads = run_with_grads(triton_on_device, *tensors, params + (softmax,))
    ref, ref_grads = run_with_grads(dcnv3_reference, *[t.double() for t in tensors], params + (softmax,))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert rel_err(out.double(), ref) < out_tol
    for grad, ref_grad, name in zip(grads, ref_grads, ("input", "offset", "mask")):
        assert rel_err(grad.double(), ref_grad) < grad_tol, name


@pytest.fixture(scope="module")
def official_cases():
    return torch.load(FIXTURES / "dcnv3_op_cases.pt", weights_only=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_official_fixture_cases(official_cases, dtype, tol):
    assert len(official_cases) >= 5
    for case in official_cases:
        params = tuple(case["params"][k] for k in PARAM_NAMES)
        params = params[:-1] + (bool(params[-1]),)
        out, grads = run_with_grads(triton_on_device, case["input"].to(dtype), case["offset"].to(dtype),
                                    case["mask"].to(dtype), params, case["grad_output"])
        assert rel_err(out.double(), case["output"]) < tol, case["params"]
        for grad, name in zip(grads, ("grad_input", "grad_offset", "grad_mask")):
            assert rel_err(grad.double(), case[name]) < tol, (name, case["params"])


def small_random_configs(count, seed):
    """Random geometries small enough for the interpreter: kernels up to 5x5, up to 3 groups,
    group_channels that are mostly not powers of two, offsets up to 8 pixels (many points
    outside the image)."""
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        kernel_h, kernel_w = rng.choice([(3, 3), (3, 3), (5, 5), (1, 1), (2, 3), (3, 2), (1, 4)])
        remove_center = kernel_h == kernel_w and kernel_h % 2 == 1 and kernel_h > 1 and rng.random() < 0.5
        cfg = dict(n=rng.randint(1, 2), h=rng.randint(3, 8), w=rng.randint(3, 8), kernel_h=kernel_h,
                   kernel_w=kernel_w, stride_h=rng.randint(1, 3), stride_w=rng.randint(1, 3),
                   pad_h=rng.randint(0, 2), pad_w=rng.randint(0, 2), dilation_h=rng.randint(1, 2),
                   dilation_w=rng.randint(1, 2), group=rng.randint(1, 3),
                   group_channels=rng.choice([1, 3, 5, 6, 8, 12]),
                   offset_scale=rng.choice([0.5, 1.0, 2.0]), remove_center=remove_center,
                   offset_range=rng.choice([0.5, 2.0, 8.0]), seed=rng.randint(0, 10**6))
        ho, wo = dcnv3_output_size(cfg["h"], cfg["w"], kernel_h, kernel_w, cfg["stride_h"], cfg["stride_w"],
                                   cfg["pad_h"], cfg["pad_w"], cfg["dilation_h"], cfg["dilation_w"])
        if ho > 0 and wo > 0:
            configs.append(cfg)
    return configs


@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cfg", small_random_configs(4, seed=13), ids=lambda c: str(c["seed"]))
def test_matches_reference_on_random_cases(cfg, dtype, softmax):
    input, offset, mask, params = make_case(**cfg)
    if softmax:  # logits of any scale, not uniform
        mask = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(cfg["seed"])) * 3
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    compare(input, offset, mask, params, dtype, tol, 10 * tol, softmax)


@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
def test_remove_center_with_stride_and_dilation(softmax):
    # 5x5 kernel without its centre (24 points), strides 2x1, dilation 1x2, unequal padding.
    input, offset, mask, params = make_case(1, 9, 8, 5, 5, 2, 1, 3, 1, 1, 2, 2, 3, 1.5, True, offset_range=1.5)
    compare(input, offset, mask, params, torch.float64, 1e-10, 1e-9, softmax)


@pytest.mark.parametrize("group_channels", [3, 6, 12])
def test_group_channels_not_a_power_of_two(group_channels):
    input, offset, mask, params = make_case(2, 5, 6, 3, 3, 1, 1, 1, 1, 1, 1, 2, group_channels, 1.0, False)
    compare(input, offset, mask, params, torch.float32, 1e-5, 1e-4, softmax=True)


def test_far_offsets_contribute_nothing():
    input, offset, mask, params = make_case(2, 5, 6, 3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0, False)
    points = offset.shape[-1] // 2
    far = torch.rand(offset.shape[:-1] + (points,), generator=torch.Generator().manual_seed(3)) < 0.3
    moved = offset.clone().reshape(*offset.shape[:-1], points, 2)
    extreme = torch.tensor([1e30, -1e30, 1e300, -1e300, 1e6, -1e6, 40.0, -40.0], dtype=torch.float64)
    choice = extreme[torch.randint(len(extreme), far.shape, generator=torch.Generator().manual_seed(4))]
    moved[..., 0] = torch.where(far, choice, moved[..., 0])
    moved[..., 1] = torch.where(far, choice.flip(-1), moved[..., 1])
    moved = moved.reshape(offset.shape)
    out, (g_in, g_off, g_mask) = run_with_grads(triton_on_device, input, moved, mask, params)
    expected, (e_in, _, _) = run_with_grads(dcnv3_reference, input, offset, mask * ~far, params)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(g_in, e_in)
    assert (g_mask[far] == 0).all()
    assert (g_off.reshape(*far.shape, 2)[far] == 0).all()


@pytest.mark.parametrize("softmax", [False, True], ids=["mask", "softmax"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_offset_gives_nan_in_its_pixel_and_group(bad, softmax):
    group, group_channels, points = 3, 2, 9
    input, offset, mask, params = make_case(2, 4, 5, 3, 3, 1, 1, 1, 1, 1, 1, group, group_channels, 1.0, False)
    poisoned = offset.clone()
    poisoned[1, 2, 3, (1 * points + 5) * 2] = bad  # x of point 5, group 1
    poisoned[0, 3, 1, (2 * points + 0) * 2 + 1] = bad  # y of point 0, group 2
    params = params + (softmax,)
    out, grads = run_with_grads(triton_on_device, input, poisoned, mask, params)
    ref, ref_grads = run_with_grads(dcnv3_reference, input, poisoned, mask, params)
    nan_out = torch.zeros(out.shape, dtype=torch.bool)
    nan_out[1, 2, 3, 2:4] = True
    nan_out[0, 3, 1, 4:6] = True
    assert torch.equal(ref.isnan(), nan_out) and torch.equal(out.isnan(), nan_out)
    torch.testing.assert_close(out[~nan_out], ref[~nan_out])
    nan_offset = torch.zeros(offset.shape, dtype=torch.bool)
    nan_offset[1, 2, 3, (1 * points + 5) * 2:][:2] = True
    nan_offset[0, 3, 1, (2 * points + 0) * 2:][:2] = True
    nan_mask = torch.zeros(mask.shape, dtype=torch.bool)
    if softmax:  # through the softmax, every point of the group
        nan_mask[1, 2, 3, 1 * points:2 * points] = True
        nan_mask[0, 3, 1, 2 * points:3 * points] = True
    else:
        nan_mask[1, 2, 3, 1 * points + 5] = True
        nan_mask[0, 3, 1, 2 * points + 0] = True
    # As the C++ kernels: NaN in both coordinates' gradients (grid_sample gives NaN in one, 0 in the other).
    for grad, ref_grad, expected, name in zip(grads, ref_grads, (torch.zeros_like(nan_out), nan_offset, nan_mask),
                                              ("input", "offset", "mask")):
        assert torch.equal(grad.isnan(), expected), name
        torch.testing.assert_close(grad[~expected], ref_grad[~expected], msg=name)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_half_types_accumulate_in_float32(dtype, tol):
    input, offset, mask, params = make_case(2, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, 2, 8, 1.0, False)
    mask = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = params + (True,)
    # Rounded inputs and grad_output, so that the comparison measures the kernels' arithmetic.
    rounded = [t.to(dtype) for t in (input, offset, mask)]
    grad_output = torch.randn(2, 6, 5, 16, dtype=torch.float64).to(dtype).double()
    out, grads = run_with_grads(triton_on_device, *rounded, params, grad_output)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert rel_err(out.double(), dcnv3_reference(*[t.double() for t in rounded], *params)) < tol
    # Rounded offsets often put a point exactly on a pixel boundary, where the offset gradient
    # is one-sided: the gradients are compared with the C++ kernels, which take the same side
    # (grid_sample's normalised coordinates can land just below the boundary).
    expected, expected_grads = run_with_grads(dcnv3, *[t.double() for t in rounded], params, grad_output)
    for grad, expected_grad in zip(grads, expected_grads):
        assert rel_err(grad.double(), expected_grad) < tol


def test_backward_reports_that_it_is_not_deterministic():
    input, offset, mask, params = make_case(1, 4, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 4, 1.0, False)
    tensors = [t.requires_grad_() for t in (input, offset, mask)]
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            triton_on_device(*tensors, *params).sum().backward()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            triton_on_device(*tensors, *params).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def test_non_contiguous_inputs_and_empty_batch():
    input, offset, mask, params = make_case(1, 5, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 4, 1.0, False)
    input_nc = input.transpose(1, 2).contiguous().transpose(1, 2)
    mask_nc = torch.cat([mask, mask], -1)[..., ::2]
    mask_nc.copy_(mask)  # same values, every other element of a wider buffer
    assert not (input_nc.is_contiguous() or mask_nc.is_contiguous())
    torch.testing.assert_close(triton_on_device(input_nc, offset, mask_nc, *params),
                               dcnv3_reference(input, offset, mask, *params))
    empty = [t[:0] for t in (input, offset, mask)]
    out, grads = run_with_grads(triton_on_device, *empty, params, grad_output=torch.zeros(0, 5, 4, 4))
    assert out.shape == (0, 5, 4, 4) and [g.shape for g in grads] == [t.shape for t in empty]


@pytest.mark.parametrize("overrides,message", [
    (dict(offset=torch.zeros(1, 5, 5, 35, dtype=torch.float64)), r"offset must have shape .*\[1, 5, 5, 36\]"),
    (dict(input=torch.zeros(1, 5, 5, 6, dtype=torch.float64)), r"group \* group_channels = 2 \* 4 = 8"),
    (dict(mask=torch.zeros(1, 5, 5, 18, dtype=torch.float32)), "same dtype"),
    (dict(kernel=2, remove_center=True), "remove_center needs an odd square kernel"),
])
def test_bad_input_errors_name_the_problem(overrides, message):
    input, offset, mask, _ = make_case(1, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False)
    tensors = {"input": input, "offset": offset, "mask": mask}
    tensors.update({k: v for k, v in overrides.items() if k in tensors})
    kernel = overrides.get("kernel", 3)
    with pytest.raises(RuntimeError, match=message):
        triton_on_device(tensors["input"], tensors["offset"], tensors["mask"], kernel, kernel, 1, 1, 1, 1, 1, 1, 2, 4,
                         1.0, overrides.get("remove_center", False))


def test_torch_compile_fullgraph_with_autograd():
    # Under the interpreter the op is opaque to torch.compile (the interpreter cannot be traced);
    # with compiled kernels it is a triton_op that Dynamo, AOTAutograd and Inductor trace into.
    input, offset, mask, params = make_case(1, 4, 5, 3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0, False, dtype=torch.float32)
    tensors = [t.to(DEVICE).requires_grad_() for t in (input, offset, mask)]

    def layer(input, offset, mask):
        return dcnv3_triton(input, offset, mask, *params, softmax=True).relu() * 2

    def output_and_grads(fn):
        out = fn(*tensors)
        return [out] + list(torch.autograd.grad(out, tensors, torch.linspace(-1, 1, out.numel(),
                                                                             device=DEVICE).view(out.shape)))

    expected = output_and_grads(layer)
    for backend in ["aot_eager"] + ([] if INTERPRETED else ["inductor"]):
        torch._dynamo.reset()
        for got, want in zip(output_and_grads(torch.compile(layer, fullgraph=True, backend=backend)), expected):
            torch.testing.assert_close(got, want)


def test_opcheck():
    input, offset, mask, params = make_case(1, 3, 3, 2, 2, 1, 1, 1, 0, 1, 1, 1, 2, 1.0, False, dtype=torch.float32)
    tensors = tuple(t.to(DEVICE).requires_grad_() for t in (input, offset, mask))
    # AOT dispatch traces into the kernels, which only compiled kernels allow.
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    checks += () if INTERPRETED else ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.ops_dcnv3.dcnv3_triton_forward.default, tensors + params + (True,),
                          test_utils=checks)


@pytest.mark.skipif(INTERPRETED, reason="CPU-only check: with a GPU the other tests compile and run the kernels")
def test_cpu_tensors_without_interpreter_are_a_clear_error():
    input, offset, mask, params = make_case(1, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 2, 1.0, False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dcnv3_triton(input, offset, mask, *params)


COMPILE_FOR_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ops_dcnv3 import triton_ops

assert not triton_ops.INTERPRETED

def signature(kernel, pointer_types):
    pointers = iter(pointer_types)
    return {name: next(pointers) if name.endswith("_ptr") else "constexpr" if name.isupper() else "i32"
            for name in kernel.arg_names}

for kernel, dtype, accumulation, softmax, remove_center in [
        (triton_ops._dcnv3_forward_kernel, "fp32", "fp32", True, False),
        (triton_ops._dcnv3_backward_kernel, "fp32", "fp32", True, True),
        (triton_ops._dcnv3_backward_kernel, "bf16", "fp32", True, False),
        (triton_ops._dcnv3_backward_kernel, "fp64", "fp64", False, False)]:
    pointers = [f"*{dtype}"] * 5
    if "backward" in kernel.__name__:  # then grad_input (accumulation type), grad_offset, grad_mask
        pointers += [f"*{accumulation}", f"*{dtype}", f"*{dtype}"]
    constants = dict(KERNEL_H=3, KERNEL_W=3, REMOVE_CENTER=int(remove_center), SOFTMAX=softmax,
                     FP64=dtype == "fp64", BLOCK_PIX=32, BLOCK_C=16, BLOCK_P=16)
    compiled = triton.compile(ASTSource(kernel, signature(kernel, pointers), constexprs=constants),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], kernel.__name__
    print("compiled", kernel.__name__, dtype)
"""


@pytest.mark.skipif(not INTERPRETED, reason="with a GPU the other tests compile the kernels for it")
def test_kernels_compile_for_sm90_without_a_gpu():
    # Triton compiles to a cubin offline (its own ptxas), so the GPU code path's lowering
    # (float64 atomics, the constexpr branches, NaN/Inf constants) is checked on CPU-only CI.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    assert child.stdout.count("compiled") == 4
