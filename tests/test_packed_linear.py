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
            assert not packed_linear._usable(layer, x)
        assert packed_linear._usable(layer, x) == packed_linear.AVAILABLE


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
