"""InternImage backbone and classifier: official state-dict layout of every variant,
parity with the official outputs, checkpoint formats, freezing, odd sizes, checkpointing."""
import json
from pathlib import Path

import pytest
import torch

import internimage
from internimage import InternImage, InternImageClassifier, build_model
from internimage.checkpoint import HEAD_PREFIXES
from internimage.models.variants import ARCH_SETTINGS, PRETRAINED_CFGS, VARIANTS

FIXTURES = Path(__file__).resolve().parent / "data" / "official"


def fixture(name):
    return FIXTURES / name  # committed with the tests: a missing file is a failure, not a skip


@pytest.fixture(scope="module")
def official_shapes():
    with open(fixture("official_state_dict_shapes.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_matches_official_layout(official_shapes, variant):
    official = official_shapes[variant]
    with torch.device("meta"):
        model = build_model(f"internimage_{variant}")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == official["num_params"]
    # The backbone is the same minus the classification head.
    with torch.device("meta"):
        backbone = InternImage(arch=variant, layer_scale=VARIANTS[variant]["layer_scale"])
    expected = {k: v for k, v in official["state_dict"].items() if not k.startswith(HEAD_PREFIXES)}
    assert {k: list(v.shape) for k, v in backbone.state_dict().items()} == expected
    # The official constructor kwargs recorded with the fixture give the same model.
    with torch.device("meta"):
        from_official_kwargs = InternImageClassifier(**official["config"])
    assert {k: list(v.shape) for k, v in from_official_kwargs.state_dict().items()} == official["state_dict"]


def tiny(name):
    data = torch.load(fixture(f"{name}.pt"), weights_only=True)
    return data


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", ["tiny_t_style", "tiny_b_style"])
@pytest.mark.parametrize("core_op", ["DCNv3", "DCNv3_pytorch"])
def test_tiny_models_reproduce_official_outputs(name, core_op):
    data = tiny(name)
    classifier = InternImageClassifier(core_op=core_op, **data["config"]).double().eval()
    classifier.load_state_dict(data["state_dict"], strict=True)
    with torch.no_grad():
        logits = classifier(data["input"])
    assert rel_err(logits, data["logits"]) < 1e-8

    config = {k: v for k, v in data["config"].items() if k != "num_classes"}
    backbone = InternImage(core_op=core_op, **config).double().eval()
    backbone_sd = {k: v for k, v in data["state_dict"].items() if not k.startswith(HEAD_PREFIXES)}
    backbone.load_state_dict(backbone_sd, strict=True)
    with torch.no_grad():
        features = backbone(data["input"])
    assert len(features) == 4
    for got, want in zip(features, data["features"]):
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-8


def official_formats(state_dict):
    """The same weights as each released checkpoint format."""
    return {
        "classification": {"model": state_dict},
        "mmdet2": {"state_dict": {f"backbone.{k}": v for k, v in state_dict.items()
                                  if not k.startswith(HEAD_PREFIXES)} | {"neck.lateral_convs.0.conv.weight":
                                                                          torch.zeros(1)},
                   "meta": {"mmdet_version": "2.28.1", "CLASSES": ("a", "b")}},
        "mmseg0_ddp": {"state_dict": {f"module.backbone.{k}": v for k, v in state_dict.items()},
                       "meta": {"mmseg_version": "0.27.0"}},
        "bare": dict(state_dict),
    }


@pytest.mark.parametrize("fmt", ["classification", "mmdet2", "mmseg0_ddp", "bare"])
def test_every_checkpoint_format_loads_through_init_cfg(tmp_path, fmt):
    data = tiny("tiny_b_style")
    path = tmp_path / f"{fmt}.pth"
    torch.save(official_formats(data["state_dict"])[fmt], path)
    config = {k: v for k, v in data["config"].items() if k != "num_classes"}
    backbone = InternImage(**config, init_cfg=dict(type="Pretrained", checkpoint=str(path))).double()
    backbone.init_weights()
    backbone.eval()
    with torch.no_grad():
        features = backbone(data["input"])
    for got, want in zip(features, data["features"]):
        assert rel_err(got, want) < 1e-8

    # The classifier (build path of build_model(pretrained=...)) from the same file.
    classifier = InternImageClassifier(**data["config"]).double()
    internimage.load_classifier_weights(classifier, str(path))
    if fmt in ("classification", "bare", "mmseg0_ddp"):
        with torch.no_grad():
            assert rel_err(classifier.double().eval()(data["input"]), data["logits"]) < 1e-8


def test_convert_checkpoint_tool_round_trip(tmp_path):
    import subprocess
    import sys

    data = tiny("tiny_t_style")
    src = tmp_path / "official.pth"
    torch.save({"model": data["state_dict"]}, src)
    dst = tmp_path / "converted.pth"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "tools" / "convert_checkpoint.py"), str(src), str(dst)], check=True,
                   cwd=repo)
    converted = torch.load(dst, weights_only=True)
    assert set(converted) >= {"state_dict", "meta"}
    assert converted["state_dict"].keys() == data["state_dict"].keys()
    # Already in this project's form: conversion is the identity.
    assert internimage.to_state_dict(converted).keys() == data["state_dict"].keys()


def test_layer_scale_one_missing_from_checkpoint_is_logged_once(tmp_path, monkeypatch):
    data = tiny("tiny_t_style")  # no layer scale in the checkpoint
    path = tmp_path / "t.pth"
    torch.save({"model": data["state_dict"]}, path)
    config = {k: v for k, v in data["config"].items() if k != "num_classes"}
    config["layer_scale"] = 1.0
    backbone = InternImage(**config, init_cfg=dict(type="Pretrained", checkpoint=str(path))).double()
    messages = []
    monkeypatch.setattr(internimage.checkpoint.loading, "print_log", lambda msg, **kwargs: messages.append(msg))
    backbone.init_weights()
    log = "\n".join(messages)
    lines = [line for line in messages if "layer-scale" in line]
    assert len(lines) == 1 and "same as no layer scale" in lines[0]
    assert "Missing keys" not in log and "Unexpected keys" not in log
    gammas = [p for n, p in backbone.named_parameters() if n.endswith(("gamma1", "gamma2"))]
    assert gammas and all(torch.equal(g, torch.ones_like(g)) for g in gammas)
    with torch.no_grad():
        features = backbone.eval()(data["input"])
    assert rel_err(features[-1], data["features"][-1]) < 1e-8


def test_shape_mismatch_names_the_key(tmp_path):
    data = tiny("tiny_t_style")
    state_dict = dict(data["state_dict"])
    state_dict["levels.0.blocks.0.dcn.offset.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pth"
    torch.save({"model": state_dict}, path)
    config = {k: v for k, v in data["config"].items() if k != "num_classes"}
    backbone = InternImage(**config, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    with pytest.raises(ValueError, match=r"levels\.0\.blocks\.0\.dcn\.offset\.weight.*\(3, 3\).*\(18, 16\)"):
        backbone.init_weights()


def test_new_head_is_skipped_when_classes_differ(tmp_path):
    data = tiny("tiny_t_style")  # 10 classes
    path = tmp_path / "cls.pth"
    torch.save({"model": data["state_dict"]}, path)
    model = build_model("t", num_classes=3, pretrained=str(path), channels=16, depths=[1, 1, 2, 1],
                        groups=[1, 2, 4, 8], drop_path_rate=0.0)
    assert model.head.weight.shape == (3, 128 * 3 // 2)
    assert torch.equal(model.patch_embed.conv1.weight, data["state_dict"]["patch_embed.conv1.weight"].float())


def test_frozen_stages_stay_frozen_after_train():
    backbone = InternImage(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], frozen_stages=2)
    backbone.train()
    frozen = [backbone.patch_embed, backbone.levels[0], backbone.levels[1]]
    for module in frozen:
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
    for module in backbone.levels[2:]:
        assert module.training
        assert all(p.requires_grad for p in module.parameters())


def test_odd_input_sizes_and_out_indices():
    backbone = InternImage(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 97, 131))
    # stem: ceil twice -> 25x33; then ceil halvings
    assert [tuple(o.shape) for o in outs] == [(1, 32, 13, 17), (1, 128, 4, 5)]


def test_with_cp_gives_the_same_gradients():
    torch.manual_seed(0)
    kwargs = dict(channels=16, depths=[1, 2, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)
    plain = InternImage(**kwargs)
    checkpointed = InternImage(**kwargs, with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (plain, checkpointed):
        model.zero_grad()
        sum(o.square().mean() for o in model(x)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_backbone_traces_with_torch_compile_fullgraph():
    torch.manual_seed(0)
    backbone = InternImage(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0).eval()
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(backbone, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for got, want in zip(compiled(x), backbone(x)):
            torch.testing.assert_close(got, want)


def _saved_bytes(fn):
    """Bytes autograd keeps for backward while ``fn`` runs (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_memory_saving_mlp_same_results_less_saved():
    """The training MLP recomputes its GELU instead of storing it: identical forward, the
    same gradients (float64), and about hidden-size values per pixel fewer saved."""
    from internimage.models.backbone import MLPLayer

    torch.manual_seed(0)
    mlp = MLPLayer(16, 64).double()
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64, requires_grad=True)
    results = {}
    for fused in (True, False):
        mlp.zero_grad()
        x.grad = None
        MLPLayer._saves_memory, original = (lambda self, x: fused), MLPLayer._saves_memory
        try:
            out, saved = _saved_bytes(lambda: mlp(x))
        finally:
            MLPLayer._saves_memory = original
        out.sin().sum().backward()
        results[fused] = (out.detach(), saved, x.grad.clone(), {n: p.grad.clone() for n, p in mlp.named_parameters()})
    assert torch.equal(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][2], results[False][2], rtol=1e-12, atol=1e-12)
    for name in results[False][3]:
        torch.testing.assert_close(results[True][3][name], results[False][3][name], rtol=1e-12, atol=1e-12)
    assert results[False][1] - results[True][1] == 2 * 5 * 7 * 64 * 8  # the GELU output, float64
    assert torch.autograd.gradcheck(lambda t: mlp(t), (x.detach().requires_grad_(),))
    with pytest.raises(RuntimeError):  # no silent wrong second derivatives
        (grad,) = torch.autograd.grad(mlp(x).sum(), x, create_graph=True)
        grad.sum().backward()
    # inference, dropout and autocast take the plain path
    assert mlp._saves_memory(x) and not MLPLayer(16, 64, drop=0.1)._saves_memory(x)
    calls = []
    handle = mlp.fc1.register_forward_hook(lambda *args: calls.append(1))  # hooks see the plain layers
    mlp(x)
    mlp.eval()(x)
    mlp.train()
    assert calls == [1, 1]
    handle.remove()
    with torch.no_grad():
        assert not mlp._saves_memory(x)


def test_arch_fills_the_architecture_and_keywords_override():
    with torch.device("meta"):
        l_arch = InternImage(arch="l")
        assert (l_arch.channels, l_arch.depths, l_arch.post_norm) == (160, [5, 5, 22, 5], True)
        assert l_arch.levels[0].blocks[0].dcn.offset_scale == 2.0
        # An explicit setting wins over the arch; a dict arch works like a name.
        assert InternImage(arch="l", offset_scale=1.0).levels[0].blocks[0].dcn.offset_scale == 1.0
        tiny = InternImage(arch=dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8]))
        assert (tiny.channels, tiny.depths, tiny.post_norm) == (16, [1, 1, 2, 1], False)
        h = InternImage(arch="h")
        assert h.levels[2].post_norm_block_ids == [5, 11, 17, 23, 29]
        assert h.levels[0].blocks[0].dcn.dw_kernel_size == 5 and h.levels[0].blocks[0].res_post_norm
        # The arch's level-2 norms can be switched off; ids without level2_post_norm are an error.
        assert InternImage(arch="h", level2_post_norm=False).levels[2].post_norm_block_ids is None
    with pytest.raises(ValueError, match="level2_post_norm_block_ids is only used with level2_post_norm=True"):
        InternImage(arch="t", level2_post_norm_block_ids=[1])
    with pytest.raises(ValueError, match="level2_post_norm_block_ids is only used with level2_post_norm=True"):
        InternImage(arch=dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], level2_post_norm_block_ids=[1]))
    with pytest.raises(ValueError, match="not architecture settings: \\['drop_path_rate'\\]"):
        InternImage(arch=dict(channels=16, drop_path_rate=0.1))
    with pytest.raises(KeyError, match="unknown InternImage variant 'q'"):
        InternImage(arch="q")


def test_every_release_names_a_known_architecture_and_an_official_file():
    for name, release in PRETRAINED_CFGS.items():
        assert release["arch"] in ARCH_SETTINGS and name.startswith(f"internimage_{release['arch']}_")
        assert release["url"].startswith("https://huggingface.co/OpenGVLab/InternImage/resolve/main/")
        assert release["url"].endswith(".pth")


def test_classifier_has_the_timm_interface():
    torch.manual_seed(0)
    model = InternImageClassifier(arch=dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8]),
                                  num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, 128, 2, 2)  # the last stage, NCHW
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, int(128 * 1.5))
    assert torch.equal(model.forward_head(features), model.head(pooled))
    assert torch.equal(model(x), model.head(pooled))
    # H/G head: forward_features is the fused map that the attention projector pools.
    clip = InternImageClassifier(arch=dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8]),
                                 use_clip_projector=True, num_classes=5).eval()
    fused = clip.forward_features(x)
    assert fused.shape == (2, 1024, 4, 4)
    assert clip.forward_head(fused, pre_logits=True).shape == (2, 768)
    assert torch.equal(clip(x), clip.forward_head(fused))


def test_classifier_pretrained_init_cfg_loads_the_head(tmp_path):
    arch = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8])
    source = InternImageClassifier(arch=arch, num_classes=5)
    torch.save({"model": source.state_dict()}, tmp_path / "cls.pth")
    model = InternImageClassifier(arch=arch, num_classes=5,
                                  init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "cls.pth")))
    model.init_weights()
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
