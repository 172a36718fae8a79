"""Inference linear layers on oneDNN with prepacked weights (ops_dcnv3.packed_linear)."""
import pytest
import torch
import torch.nn.functional as F

from internimage import InternImage
from ops_dcnv3 import packed_linear
from ops_dcnv3.packed_linear import linear, release_packed_weights

needs_onednn = pytest.mark.skipif(not packed_linear.AVAILABLE, reason="PyTorch without the oneDNN linear ops")


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 9, 64), (1, 1, 64)])
@pytest.mark.parametrize("gelu", [False, True])
def test_packed_linear_matches_nn_linear(shape, gelu):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(*shape)
    want = F.gelu(layer(x)) if gelu else layer(x)
    with torch.inference_mode():
        got = linear(layer, x, gelu=gelu)
        assert hasattr(layer, packed_linear._CACHE_ATTR)  # the oneDNN path ran
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert list(layer.state_dict()) == ["weight", "bias"]


@needs_onednn
def test_packed_weight_follows_weight_updates():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = linear(layer, x)
        layer.weight.mul_(2)  # in place (optimizer step, load_state_dict): repacked
        torch.testing.assert_close(linear(layer, x), layer(x), rtol=1e-5, atol=1e-5)
        layer.load_state_dict({"weight": torch.zeros(8, 16), "bias": torch.ones(8)})
        torch.testing.assert_close(linear(layer, x), torch.ones(3, 8))
    assert not torch.equal(first, torch.ones(3, 8))
    release_packed_weights(torch.nn.Sequential(layer))
    assert not hasattr(layer, packed_linear._CACHE_ATTR)


@needs_onednn
def test_model_built_under_inference_mode_runs_and_follows_loaded_weights():
    # Parameters made under inference_mode are inference tensors, without the version counter
    # that the packed-weight cache keys on: that cache must not be used for them (it raised).
    torch.manual_seed(0)
    kwargs = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)
    trained = InternImage(**kwargs).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        want = trained(x)
        model = InternImage(**kwargs).eval()
        before = model(x)
        model.load_state_dict(trained.state_dict())  # copies into the same inference tensors
        got = model(x)
    for a, b, c in zip(got, want, before):
        torch.testing.assert_close(a, b)
        assert not torch.allclose(c, b)


def test_plain_path_where_packing_does_not_apply(monkeypatch):
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    assert not packed_linear._usable(layer, x)  # grad enabled
    with torch.no_grad():
        assert not packed_linear._usable(layer, x.double())
        assert not packed_linear._usable(layer, x.t().contiguous().t())  # non-contiguous
        assert not packed_linear._usable(layer, x[:0])
        handle = layer.register_forward_hook(lambda *args: None)
        assert not packed_linear._usable(layer, x)
        handle.remove()
        monkeypatch.setenv("INTERNIMAGE_PACKED_LINEAR", "0")
        assert not packed_linear._usable(layer, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            monkeypatch.setenv("INTERNIMAGE_PACKED_LINEAR", "1")
            # bfloat16 autocast: packed only where oneDNN has native bfloat16 kernels
            assert packed_linear._usable(layer, x) == packed_linear.BF16_AVAILABLE
            assert not packed_linear._usable(layer, x.double())
        with torch.autocast("cpu", dtype=torch.float16):
            assert not packed_linear._usable(layer, x)
        assert packed_linear._usable(layer, x) == packed_linear.AVAILABLE
        assert packed_linear._usable(layer.bfloat16(), x.bfloat16()) == packed_linear.BF16_AVAILABLE
    made_before = torch.nn.Linear(16, 8)
    with torch.inference_mode():
        # weights made under inference_mode: no version counter, so no cached packed copy;
        # the plain layer, not a packing at every call
        made_here = torch.nn.Linear(16, 8)
        assert not packed_linear._usable(made_here, x)
        assert packed_linear._usable(made_before, x) == packed_linear.AVAILABLE
        assert packed_linear.inference_dtype([made_here], [made_here.weight], x) is None


@needs_onednn
def test_backbone_inference_same_with_and_without_packing(monkeypatch):
    torch.manual_seed(0)
    model = InternImage(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        packed = model(x)
        monkeypatch.setenv("INTERNIMAGE_PACKED_LINEAR", "0")
        plain = model(x)
    for a, b in zip(packed, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(hasattr(m, packed_linear._CACHE_ATTR) for m in model.modules())
    model.train()  # training frees the inference copies
    assert not any(hasattr(m, packed_linear._CACHE_ATTR) for m in model.modules())


needs_bf16 = pytest.mark.skipif(not packed_linear.BF16_AVAILABLE,
                                reason="no native bfloat16 oneDNN kernels on this CPU (AVX512-BF16/AMX/AVX-NE-CONVERT)")


@needs_bf16
@pytest.mark.parametrize("gelu", [False, True])
def test_packed_bfloat16_under_autocast_matches_autocast_linear(gelu):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(2, 7, 9, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.gelu(layer(x)) if gelu else layer(x)
        got = linear(layer, x, gelu=gelu)
        assert torch.bfloat16 in getattr(layer, packed_linear._CACHE_ATTR)  # the packed bfloat16 path ran
        again = linear(layer, x.bfloat16(), gelu=gelu)  # bfloat16 input: same result
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    with torch.no_grad():
        layer.weight.mul_(2)  # repacked after an in-place update
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(linear(layer, x), layer(x), rtol=2e-2, atol=2e-2)


@needs_bf16
def test_backbone_under_bfloat16_autocast_same_with_and_without_packing(monkeypatch):
    torch.manual_seed(0)
    model = InternImage(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = model(x)
        monkeypatch.setenv("INTERNIMAGE_PACKED_LINEAR", "0")
        plain = model(x)
    for a, b in zip(packed, plain):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


def test_bfloat16_path_plumbing_with_stand_in_kernels(monkeypatch):
    """Where the CPU has no native bfloat16 kernels the packed bfloat16 path cannot run; its
    casting, caching per dtype and repacking are checked with stand-ins for the two oneDNN
    ops (the product in float32, rounded to bfloat16) so that they are tested everywhere."""
    calls = []

    def reorder(weight):
        calls.append(("reorder", weight.dtype))
        return weight.clone()

    def pointwise(x, weight, bias, attr, scalars, algorithm):
        calls.append(("linear", x.dtype, weight.dtype, None if bias is None else bias.dtype))
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return (F.gelu(out) if attr == "gelu" else out).to(x.dtype)

    monkeypatch.setattr(packed_linear, "BF16_AVAILABLE", True)
    monkeypatch.setattr(packed_linear, "AVAILABLE", True)
    monkeypatch.setattr(packed_linear, "_reorder_weight", reorder)
    monkeypatch.setattr(packed_linear, "_linear_pointwise", pointwise)
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = F.gelu(layer(x))
            got = linear(layer, x, gelu=True)
            linear(layer, x.bfloat16(), gelu=True)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        assert calls == [("reorder", torch.bfloat16), ("linear", torch.bfloat16, torch.bfloat16, torch.bfloat16),
                         ("linear", torch.bfloat16, torch.bfloat16, torch.bfloat16)]  # packed once
        calls.clear()
        linear(layer, x)  # float32 outside autocast: its own cached copy next to the bfloat16 one
        assert calls[0] == ("reorder", torch.float32)
        assert set(getattr(layer, packed_linear._CACHE_ATTR)) == {torch.float32, torch.bfloat16}
        calls.clear()
    with torch.no_grad():
        layer.bias.add_(1)  # an in-place update of the bias alone repacks too
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(linear(layer, x), layer(x), rtol=2e-2, atol=2e-2)
    assert calls[0] == ("reorder", torch.bfloat16)


@needs_onednn
def test_linear_pair_is_one_product_equal_to_two_layers():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(32, 18), torch.nn.Linear(32, 9, bias=False)
    x = torch.randn(2, 3, 4, 32)
    with torch.inference_mode():
        a, b = packed_linear.linear_pair(first, second, x)
        assert a.data_ptr() + 18 * a.element_size() == b.data_ptr()  # channel slices of one output
        torch.testing.assert_close(a, first(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, second(x), rtol=1e-5, atol=1e-5)
        second.weight.mul_(-1)  # either layer's update repacks the pair
        torch.testing.assert_close(packed_linear.linear_pair(first, second, x)[1], second(x), rtol=1e-5, atol=1e-5)
    a, b = packed_linear.linear_pair(first, second, x)  # autograd on: the two layers themselves
    assert a.requires_grad and a.is_contiguous() and b.is_contiguous()
    release_packed_weights(torch.nn.Sequential(first, second))
    assert not hasattr(first, packed_linear._CACHE_ATTR)


needs_conv = pytest.mark.skipif(not packed_linear.CONV_AVAILABLE, reason="PyTorch without the oneDNN conv ops")


@needs_conv
@pytest.mark.parametrize("in_ch,out_ch,stride,groups,bias", [(3, 8, 2, 1, True), (16, 32, 2, 1, False),
                                                             (16, 16, 1, 16, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_conv2d_matches_nn_conv2d(in_ch, out_ch, stride, groups, bias, channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(in_ch, out_ch, 3, stride, 1, groups=groups, bias=bias)
    x = torch.randn(2, in_ch, 11, 13)
    if channels_last:
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # an NHWC tensor seen as NCHW
    with torch.inference_mode():
        got = packed_linear.conv2d(conv, x)
        assert hasattr(conv, packed_linear._CACHE_ATTR)  # the oneDNN path ran
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, conv(x), rtol=1e-5, atol=1e-5)
        # packed for one input size, right for others (oneDNN reorders if its choice differs)
        other = torch.randn(1, in_ch, 7, 20)
        torch.testing.assert_close(packed_linear.conv2d(conv, other), conv(other), rtol=1e-5, atol=1e-5)
        conv.weight.mul_(-1)  # an in-place update repacks
        torch.testing.assert_close(packed_linear.conv2d(conv, x), conv(x), rtol=1e-5, atol=1e-5)
    got = packed_linear.conv2d(conv, x)  # autograd: the layer itself
    assert got.requires_grad
    release_packed_weights(torch.nn.Sequential(conv))
    assert not hasattr(conv, packed_linear._CACHE_ATTR)


@needs_conv
def test_packed_conv2d_packs_once_per_input_shape(monkeypatch):
    # oneDNN lays a packed weight out for one input shape; used for another shape it was
    # reordered again inside every call. One pack per change of shape, none per call.
    shapes = []
    reorder = packed_linear._reorder_conv_weight
    monkeypatch.setattr(packed_linear, "_reorder_conv_weight", lambda *args: shapes.append(args[-1]) or reorder(*args))
    conv = torch.nn.Conv2d(8, 16, 3, 2, 1)
    small, large = torch.randn(1, 8, 16, 16), torch.randn(2, 8, 24, 20)
    with torch.no_grad():
        for x in (small, small, large, large, small):
            torch.testing.assert_close(packed_linear.conv2d(conv, x), conv(x), rtol=1e-5, atol=1e-5)
    assert shapes == [list(small.shape), list(large.shape), list(small.shape)]


TINY_ARCHS = {
    "t": dict(),
    "layer-scale": dict(layer_scale=0.5),
    "layer-scale-post-norm": dict(layer_scale=1e-5, post_norm=True),
    "res-post-norm-center-scale": dict(res_post_norm=True, center_feature_scale=True, layer_scale=1.0),
}


@needs_conv
@pytest.mark.parametrize("arch", TINY_ARCHS, ids=str)
def test_block_inference_path_equals_the_module_path(arch, monkeypatch):
    """InternImageBlock's inference path (the packed products called directly, one check per
    block, the offset/mask branch fused: ops_dcnv3.dw_conv_ln_gelu, and in pre-norm blocks the
    residual sum with the second norm: ops_dcnv3.add_layer_norm_) computes what the blocks'
    modules compute, up to float32 rounding."""
    from internimage.models import backbone

    torch.manual_seed(0)
    model = InternImage(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0,
                        **TINY_ARCHS[arch]).eval()
    for module in model.modules():  # non-trivial offsets, masks, norms and gates
        for name, param in module.named_parameters(recurse=False):
            if name in ("weight", "bias") or "center_feature_scale" in name:
                param.data.normal_(0, 0.2).add_(1 if (name == "weight" and param.dim() == 1) else 0)
    x = torch.randn(2, 3, 64, 64)
    taken, fused_sums = [], []
    fast, add_layer_norm = backbone.InternImageBlock._inference_forward, backbone._ADD_LAYER_NORM_
    monkeypatch.setattr(backbone.InternImageBlock, "_inference_forward",
                        lambda self, *args: taken.append(self) or fast(self, *args))
    monkeypatch.setattr(backbone, "_ADD_LAYER_NORM_", lambda *args: fused_sums.append(1) or add_layer_norm(*args))
    with torch.inference_mode():
        got = model(x)
        assert len(taken) == 5
        # pre-norm: each block's two residual sums, each with the norm after it (the second
        # block's LN, the next block's first or the stage's: InternImageStage._fused_inference_forward)
        assert len(fused_sums) == (0 if "post-norm" in arch else 10)
        monkeypatch.setattr(backbone, "inference_dtype", lambda *args: None)
        want = model(x)
    assert len(taken) == 5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_conv
def test_stage_fuses_each_last_residual_sum_with_the_next_norm_only_where_nothing_is_bypassed(monkeypatch):
    """In inference a stage of pre-norm blocks makes each block's last residual sum together
    with the LayerNorm after it (the next block's first, after the last block the stage's);
    a hook on a block or on the stage's norm, level-2 post norms or autograd keep the blocks
    called one by one, with the same results."""
    from internimage.models import backbone

    def build(**arch):
        torch.manual_seed(0)
        model = InternImage(channels=16, depths=[2, 1, 3, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0, **arch).eval()
        for name, param in model.named_parameters():  # norms with non-trivial affine parameters
            if "norm" in name:
                param.data.normal_(0, 0.3).add_(1 if name.endswith("weight") else 0)
        return model

    fused = []
    stage_path = backbone.InternImageStage._fused_inference_forward
    monkeypatch.setattr(backbone.InternImageStage, "_fused_inference_forward",
                        lambda self, x: (lambda out: fused.append(out is not None) or out)(stage_path(self, x)))
    x = torch.randn(1, 3, 64, 64)

    def run(model):
        fused.clear()
        with torch.inference_mode():
            got = model(x)
            with monkeypatch.context() as m:
                m.setattr(backbone, "inference_dtype", lambda *args: None)  # the blocks' module path
                want = model(x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        return fused[:len(model.levels)]

    model = build()
    assert run(model) == [True] * 4
    seen = []
    model.levels[2].blocks[1].register_forward_hook(lambda *args: seen.append("block"))
    model.levels[1].norm.register_forward_pre_hook(lambda *args: seen.append("norm"))
    assert run(model) == [True, False, False, True] and seen == ["norm", "block"] * 2
    assert run(build(level2_post_norm=True, level2_post_norm_block_ids=[1])) == [True, True, False, True]  # level 2
    with torch.no_grad():
        assert model.levels[0]._fused_inference_forward(torch.randn(1, 16, 16, 16)) is not None
    assert model.levels[0]._fused_inference_forward(torch.randn(1, 16, 16, 16)) is None  # autograd on
    other = build()
    other.levels[0].blocks[1].norm1 = torch.nn.Identity()  # a layer the blocks' path does not cover
    assert run(other) == [False, True, True, True]


@needs_conv
def test_block_inference_path_steps_aside_for_hooks_training_and_other_layers():
    from internimage.models import backbone

    torch.manual_seed(0)
    model = InternImage(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0).eval()
    block = model.levels[0].blocks[0]
    torch.nn.init.normal_(block.dcn.offset.weight, std=0.5)  # the depthwise branch matters
    torch.nn.init.normal_(block.dcn.mask.weight, std=0.5)
    x = torch.randn(1, 16, 16, 16)
    with torch.inference_mode():
        assert block._inference_structure() is not None
        seen = []
        handle = block.dcn.input_proj.register_forward_hook(lambda *args: seen.append(1))
        block(x)
        assert seen == [1]  # the hook ran: the module path
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: seen.append(2))
        block(x)
        handle.remove()
        assert 2 in seen
        block.mlp.fc2.train()
        assert backbone.inference_dtype(*block._inference_structure(), x) is None
        block.mlp.fc2.eval()
        want = block._forward(x)
        block.dcn.dw_conv[2] = torch.nn.ReLU()  # a layer the path does not cover: noticed, module path
        assert block._inference_structure() is None
        got = block(x)
        assert not torch.equal(got, want) and torch.equal(got, block._forward(x))
        assert backbone.inference_dtype(*model.levels[1].blocks[0]._inference_structure(), x.double()) is None
