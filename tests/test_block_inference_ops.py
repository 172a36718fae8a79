"""The fused CPU kernels of an InternImage block at inference (float32, no autograd):
``ops_dcnv3.dw_conv_ln_gelu`` (the DCNv3 offset/mask branch: depthwise convolution, LayerNorm,
exact GELU on channels-last tensors) and ``ops_dcnv3.add_layer_norm_`` (a residual sum in place
and the next LayerNorm), against the operations they replace in float64, in every kernel copy this
CPU can run, and their use in ``DCNv3.inference_forward`` and the block's inference path."""
import math

import pytest
import torch
import torch.nn.functional as F

import ops_dcnv3
from ops_dcnv3 import DCNv3

OP = torch.ops.ops_dcnv3.dw_conv_ln_gelu
ADD_LN_ = torch.ops.ops_dcnv3.add_layer_norm_


@pytest.fixture(params=["baseline", "avx2", "avx512"])
def isa(request):
    if request.param not in ops_dcnv3.supported_cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels ({ops_dcnv3.supported_cpu_isas()})")
    previous = ops_dcnv3.set_cpu_isa(request.param)
    yield request.param
    ops_dcnv3.set_cpu_isa(previous)


def gelu64(x):
    """Exact GELU in float64 through erfc (1 + erf(x) loses the small values at x << 0)."""
    return 0.5 * x * torch.special.erfc(-x / math.sqrt(2.0))


def reference(x, weight, bias, gamma, beta, eps):
    """The three operations of the module, in float64."""
    k = weight.shape[-1]
    y = F.conv2d(x.double().permute(0, 3, 1, 2), weight.double(), None if bias is None else bias.double(),
                 padding=k // 2, groups=x.shape[-1]).permute(0, 2, 3, 1)
    return gelu64(F.layer_norm(y, (x.shape[-1],), gamma.double(), beta.double(), eps))


def make_args(batch, height, width, channels, k, with_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, height, width, channels, generator=gen)
    weight = torch.randn(channels, 1, k, k, generator=gen) * 0.4
    bias = torch.randn(channels, generator=gen) * 0.2 if with_bias else None
    gamma = torch.rand(channels, generator=gen) + 0.5
    beta = torch.rand(channels, generator=gen) - 0.5
    return x, weight, bias, gamma, beta


# (batch, H, W, C, k, bias): InternImage's 3x3 at multiples of the 32-channel block, channel
# counts with a remainder, kernels larger than the image, 1x1 and 7x7, a single pixel.
CASES = [
    (2, 7, 9, 64, 3, True),
    (1, 5, 4, 40, 3, False),
    (1, 3, 3, 16, 5, True),
    (2, 2, 6, 3, 7, True),
    (1, 4, 4, 96, 1, True),
    (1, 1, 1, 33, 3, True),
    (3, 6, 5, 256, 3, True),
]


def case_id(case):
    return "b{}_{}x{}x{}_k{}_".format(*case[:5]) + ("bias" if case[5] else "nobias")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_the_three_operations_in_float64(case, isa):
    batch, height, width, channels, k, with_bias = case
    x, weight, bias, gamma, beta = make_args(batch, height, width, channels, k, with_bias)
    out = OP(x, weight, bias, gamma, beta, 1e-6)
    assert out.shape == x.shape and out.dtype == torch.float32
    want = reference(x, weight, bias, gamma, beta, 1e-6)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-6)
    # The float32 module path (oneDNN/ATen) agrees to the same rounding.
    conv = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=k // 2, groups=channels).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, F.gelu(F.layer_norm(conv, (channels,), gamma, beta, 1e-6)), rtol=1e-5, atol=2e-6)


def test_gelu_over_its_range(isa):
    """With the norm's weight 0 the norm outputs its bias: GELU at 20001 points in [-12, 12]
    (absolute error of the erf approximation, and the small values at x << 0 kept)."""
    channels = 20001
    points = torch.linspace(-12, 12, channels)
    out = OP(torch.randn(1, 1, 1, channels), torch.randn(channels, 1, 1, 1), None, torch.zeros(channels), points,
             1e-6).flatten().double()
    want = gelu64(points.double())
    assert ((out - want).abs() <= 4e-7 * points.double().abs().clamp_min(1)).all()
    tail = points < -5  # |GELU| < 1.5e-6 there: F.gelu in float32 returns 0 below about -5.4
    assert ((out[tail] - want[tail]).abs() <= 0.05 * want[tail].abs()).all()


def test_threads_and_layout_do_not_change_the_result():
    x, weight, bias, gamma, beta = make_args(2, 9, 7, 48, 3, True, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(x, weight, bias, gamma, beta, 1e-5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(OP(x, weight, bias, gamma, beta, 1e-5), one)
    # A channels-last view of an NCHW tensor (not contiguous as NHWC) is read correctly.
    strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert not strided.is_contiguous()
    assert torch.equal(OP(strided, weight, bias, gamma, beta, 1e-5), one)
    assert OP(x[:0], weight, bias, gamma, beta, 1e-5).shape == (0, 9, 7, 48)


def test_bad_arguments():
    x, weight, bias, gamma, beta = make_args(1, 4, 4, 8, 3, True)
    with pytest.raises(RuntimeError, match="depthwise"):
        OP(x, torch.randn(8, 1, 2, 2), bias, gamma, beta, 1e-6)  # even kernel
    with pytest.raises(RuntimeError, match="depthwise"):
        OP(x, torch.randn(4, 1, 3, 3), bias, gamma, beta, 1e-6)  # other channel count
    with pytest.raises(RuntimeError, match="float32 CPU"):
        OP(x.double(), weight.double(), bias, gamma, beta, 1e-6)
    with pytest.raises(RuntimeError, match="norm's weight and bias"):
        OP(x, weight, bias, gamma[:4], beta, 1e-6)
    with pytest.raises(RuntimeError, match="bias must be"):
        OP(x, weight, bias[:3], gamma, beta, 1e-6)
    with pytest.raises(RuntimeError, match="4-D"):
        OP(x[0], weight, bias, gamma, beta, 1e-6)


def randomised(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.normal_(0, 0.2).add_(1 if name.endswith("weight") and param.dim() == 1 else 0)
    return module.eval()


def test_module_inference_path_uses_the_fused_branch(monkeypatch):
    module = randomised(DCNv3(channels=32, group=2))
    x = torch.randn(2, 6, 5, 32)
    calls = []
    monkeypatch.setattr("ops_dcnv3.modules._DW_CONV_LN_GELU", lambda *args: calls.append(1) or OP(*args))
    with torch.no_grad():
        fused = module.inference_forward(x, torch.float32)
        assert calls == [1]
        want = module(x)  # the module's own forward: conv, norm and GELU as three operations
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["even_kernel", "tanh_gelu", "no_norm_bias", "stride"])
def test_module_keeps_the_three_operations_where_the_kernel_does_not_apply(change, monkeypatch):
    module = randomised(DCNv3(channels=16, group=2, dw_kernel_size=2 if change == "even_kernel" else None))
    conv, (_, norm), act = module.dw_conv
    if change == "tanh_gelu":
        act.approximate = "tanh"
    elif change == "no_norm_bias":
        norm.bias = None
    elif change == "stride":
        conv.stride = (2, 2)
    assert not DCNv3._dw_fusable(conv, norm, act)
    monkeypatch.setattr("ops_dcnv3.modules._DW_CONV_LN_GELU", lambda *args: pytest.fail("fused kernel called"))
    if change in ("even_kernel", "stride"):
        return  # the module itself would not run (offsets of the wrong size)
    x = torch.randn(1, 5, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(module.inference_forward(x, torch.float32), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 7, 64), (3, 40), (1, 3, 3, 33), (4, 256)], ids=str)
@pytest.mark.parametrize("with_scale", [False, True], ids=["no_scale", "layer_scale"])
def test_add_layer_norm_matches_float64(shape, with_scale, isa):
    gen = torch.Generator().manual_seed(2)
    channels = shape[-1]
    x, residual = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * 3 + 1
    scale = torch.rand(channels, generator=gen) if with_scale else None
    gamma, beta = torch.rand(channels, generator=gen) + 0.5, torch.rand(channels, generator=gen) - 0.5
    total = x.clone()
    normed = ADD_LN_(total, residual, scale, gamma, beta, 1e-6)
    assert normed.shape == x.shape
    want_total = residual.double() + (x.double() if scale is None else scale.double() * x.double())
    if scale is None:
        assert torch.equal(total, residual + x)  # one float32 addition, as aten's
    else:
        torch.testing.assert_close(total.double(), want_total, rtol=1e-6, atol=1e-6)
    want = F.layer_norm(want_total, (channels,), gamma.double(), beta.double(), 1e-6)
    torch.testing.assert_close(normed.double(), want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(normed, F.layer_norm(total, (channels,), gamma, beta, 1e-6), rtol=1e-5, atol=2e-6)


def test_add_layer_norm_bad_arguments():
    x = torch.randn(2, 3, 8)
    gamma, beta = torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="same shape"):
        ADD_LN_(x, x[:1], None, gamma, beta, 1e-6)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        ADD_LN_(x.double(), x.double(), None, gamma, beta, 1e-6)
    with pytest.raises(RuntimeError, match="norm's weight and bias"):
        ADD_LN_(x, x, None, gamma[:4], beta, 1e-6)
    with pytest.raises(RuntimeError, match="scale must be"):
        ADD_LN_(x, x, torch.ones(3), gamma, beta, 1e-6)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ADD_LN_(x.transpose(0, 1), x.transpose(0, 1), None, gamma, beta, 1e-6)
    assert ADD_LN_(x[:0], x[:0], None, gamma, beta, 1e-6).shape == (0, 3, 8)
