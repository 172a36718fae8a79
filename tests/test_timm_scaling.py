"""The timm model API of the released classifiers, the paper's scaling rule, the 22K-to-1K head
map, and the throughput mode of tools/benchmark.py."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg

import internimage
from internimage.checkpoint import load_classifier_weights, load_file, map_head_22k_to_1k
from internimage.checkpoint.loading import MAP_22K_TO_1K, imagenet_22k_to_1k_rows
from internimage.models.variants import ALPHA, ARCH_SETTINGS, BETA, DEFAULT_PRETRAINED, compound_scaling

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "official"
RELEASES = tuple(DEFAULT_PRETRAINED.values())
# The paper's table of (C1, C', L1, L3); G's last stage has 4 blocks, not L1.
PAPER = {"t": (64, 16, 4, 18), "s": (80, 16, 4, 21), "b": (112, 16, 4, 21), "l": (160, 16, 5, 22),
         "xl": (192, 16, 5, 24), "h": (320, 32, 6, 32), "g": (512, 32, 2, 48)}


# --- scaling rules ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(PAPER))
def test_scaled_variant_reproduces_the_paper_table(variant):
    c1, group_channels, l1, l3 = PAPER[variant]
    settings = internimage.scaled_variant(c1, group_channels, l1, l3, l4=4 if variant == "g" else None)
    assert {k: settings[k] for k in ("channels", "depths", "groups")} == \
        {k: ARCH_SETTINGS[variant][k] for k in ("channels", "depths", "groups")}


def test_scaled_variant_builds_a_new_size_and_checks_its_input():
    arch = internimage.scaled_variant(32, 8, 1, 2, post_norm=True, offset_scale=2.0)
    assert arch == dict(channels=32, depths=[1, 1, 2, 1], groups=[4, 8, 16, 32], post_norm=True, offset_scale=2.0)
    model = internimage.InternImage(arch=arch)
    assert [f.shape[1] for f in model(torch.rand(1, 3, 64, 64))] == [32, 64, 128, 256]
    with pytest.raises(ValueError, match="multiple of group_channels"):
        internimage.scaled_variant(40, 16, 4, 18)
    with pytest.raises(ValueError, match="unknown architecture settings"):
        internimage.scaled_variant(64, 16, 4, 18, layers=3)
    with pytest.raises(ValueError, match="l3 must be a positive integer"):
        internimage.scaled_variant(64, 16, 4, 0)


def test_compound_scaling_doubles_flops_per_step():
    assert ALPHA * BETA ** 1.99 == pytest.approx(2.0, abs=0.02)
    depth, width = compound_scaling(2)
    assert (depth, width) == pytest.approx((ALPHA ** 2, BETA ** 2))


# --- timm ---------------------------------------------------------------------------------

def tiny_kwargs(fx):
    return {k: v for k, v in fx["config"].items()}


@pytest.fixture
def float64():
    """Models built in float64, so that the float64 fixtures load unrounded."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_the_seven_releases_are_timm_models_with_their_preprocessing():
    assert sorted(timm.list_models("internimage*")) == sorted(RELEASES)
    t = resolve_data_config({}, pretrained_cfg=get_pretrained_cfg("internimage_t_1k_224").to_dict())
    assert (t["input_size"], t["interpolation"], t["crop_pct"]) == ((3, 224, 224), "bicubic", 0.875)
    resize, crop = create_transform(**t).transforms[:2]
    assert resize.size == 256 and tuple(crop.size) == (224, 224)
    large = resolve_data_config({}, pretrained_cfg=get_pretrained_cfg("internimage_l_22kto1k_384").to_dict())
    assert large["input_size"] == (3, 384, 384)
    assert tuple(create_transform(**large).transforms[0].size) == (384, 384)  # squashed, as the official test
    assert get_pretrained_cfg("internimage_g_22kto1k_512").url.endswith("internimage_g_22kto1k_512.pth")


@pytest.mark.parametrize("layout", ["official", "mmengine", "hub"])
def test_timm_loads_a_local_official_checkpoint(tmp_path, layout, float64):
    """``pretrained_cfg_overlay=dict(file=...)`` with the official ``{'model': sd}`` file,
    this project's checkpoint, or the hub's ``model.``-prefixed safetensors: official outputs."""
    from internimage.checkpoint import hub

    fx = torch.load(DATA / "tiny_t_style.pt")
    if layout == "hub":
        path = tmp_path / "model.safetensors"
        from safetensors.torch import save_file
        save_file({hub.official_to_hub_key(k): v for k, v in fx["state_dict"].items()}, str(path))
    else:
        path = tmp_path / "weights.pth"
        torch.save({"model": fx["state_dict"]} if layout == "official" else {"state_dict": fx["state_dict"]}, path)
    # The fixture's head has 10 classes: the pretrained cfg says so, or timm would drop the head.
    model = timm.create_model("internimage_t_1k_224", pretrained=True, **tiny_kwargs(fx),
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    torch.testing.assert_close(model(fx["input"]), fx["logits"], rtol=0, atol=1e-8)
    new_head = timm.create_model("internimage_t_1k_224", pretrained=True, num_classes=3,
                                 pretrained_cfg_overlay=dict(file=str(path)),
                                 **{k: v for k, v in tiny_kwargs(fx).items() if k != "num_classes"})
    assert new_head.get_classifier().out_features == 3
    assert torch.equal(new_head.conv_head[0].weight, fx["state_dict"]["conv_head.0.weight"])


def test_timm_features_only_gives_the_backbone_features(float64):
    fx = torch.load(DATA / "tiny_b_style.pt")
    features = timm.create_model("internimage_b_1k_224", features_only=True, out_indices=(1, 2, 3),
                                 **tiny_kwargs(fx)).eval()
    features.model.load_state_dict(fx["state_dict"], strict=False)
    assert features.feature_info.channels() == [32, 64, 128] and features.feature_info.reduction() == [8, 16, 32]
    assert not hasattr(features.model, "conv_head") or isinstance(features.model.conv_head, torch.nn.Identity)
    for ours, official in zip(features(fx["input"]), fx["features"][1:]):
        torch.testing.assert_close(ours, official, rtol=0, atol=1e-8)
    full = timm.create_model("internimage_b_1k_224", **tiny_kwargs(fx)).eval()
    full.load_state_dict(fx["state_dict"])
    final, intermediates = full.forward_intermediates(fx["input"], indices=2)
    torch.testing.assert_close(full.forward_head(final), fx["logits"], rtol=0, atol=1e-8)
    for ours, official in zip(intermediates, fx["features"][2:]):
        torch.testing.assert_close(ours, official, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="in_chans=1 is not supported"):
        timm.create_model("internimage_t_1k_224", in_chans=1)


# --- ImageNet-22k -> 1k -------------------------------------------------------------------

def test_22k_to_1k_map_is_the_official_one():
    rows = imagenet_22k_to_1k_rows()
    # 1,000 rows of the 21,841; two 1k classes (849 and 850) share the 22k class 11136 in the official map.
    assert rows.shape == (1000,) and len(set(rows.tolist())) == 999 and rows[849] == rows[850] == 11136
    assert rows[:3].tolist() == [359, 368, 460]  # first lines of the official map22kto1k.txt
    assert Path(MAP_22K_TO_1K).read_text().split() == \
        (REPO / "internimage/checkpoint/map22kto1k.txt").read_text().split()


def test_a_22k_head_is_cut_to_1k_when_loaded_and_converted(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(arch=dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8]))
    source = internimage.InternImageClassifier(num_classes=21841, **kwargs)
    checkpoint = {"model": source.state_dict()}
    rows = imagenet_22k_to_1k_rows()
    model = internimage.InternImageClassifier(num_classes=1000, **kwargs)
    load_classifier_weights(model, checkpoint)
    assert torch.equal(model.head.weight, source.head.weight[rows])
    assert torch.equal(model.head.bias, source.head.bias[rows])
    other = internimage.InternImageClassifier(num_classes=1000, **kwargs)
    load_classifier_weights(other, checkpoint, head_22k_to_1k=False)  # skipped instead: a fresh head
    assert not torch.equal(other.head.weight, model.head.weight)
    assert map_head_22k_to_1k(checkpoint["model"], 10) is checkpoint["model"]

    src, dst = tmp_path / "in22k.pth", tmp_path / "in1k.pth"
    torch.save(checkpoint, src)
    result = subprocess.run([sys.executable, "tools/convert_checkpoint.py", src, dst, "--head-22k-to-1k"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert torch.equal(load_file(str(dst))["state_dict"]["head.weight"], source.head.weight[rows])
    result = subprocess.run([sys.executable, "tools/convert_checkpoint.py", dst, tmp_path / "again.pth",
                             "--head-22k-to-1k"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "no 21841-class head" in result.stderr


# --- throughput -----------------------------------------------------------------------------

def test_benchmark_throughput_mode():
    spec = importlib.util.spec_from_file_location("tools_benchmark", REPO / "tools" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    result = benchmark.throughput(["internimage_t_1k_224"], batch=1, repeats=1)
    assert result["internimage_t_1k_224"]["input_size"] == 224 and result["internimage_t_1k_224"]["images_per_s"] > 0
    assert benchmark.cpu_description()
