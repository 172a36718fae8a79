"""Export (tools/export.py, internimage.deploy, ops_dcnv3.onnx): ONNX files that run in stock
onnxruntime and match PyTorch, ExportedPrograms and AOTInductor packages that run in a fresh
process, and clear errors for requests that cannot be served."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="deploy extras not installed (pip install onnx onnxruntime onnxscript)")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import ops_dcnv3  # noqa: E402
from internimage import InternImage, InternImageClassifier, build_model  # noqa: E402
from internimage.deploy import (  # noqa: E402
    capture,
    check_onnx,
    compile_aoti,
    export_onnx,
    random_inputs,
    save_program,
    verify_onnx,
    verify_package,
)
from internimage.deploy.models import randomize_sampling  # noqa: E402
from ops_dcnv3.onnx import translation_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import export as export_tool  # noqa: E402

TINY = dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], mlp_ratio=2.0, drop_path_rate=0.0)
STANDARD_DOMAINS = ("ai.onnx", "ai.onnx.ml")


def run_tool(*argv):
    """tools/export.py in-process; returns (exit code, the comparisons it made)."""
    try:
        return 0, export_tool.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code, []


class CoreOp(torch.nn.Module):
    def __init__(self, **params):
        super().__init__()
        self.params = params

    def forward(self, input, offset, mask):
        return ops_dcnv3.dcnv3(input, offset, mask, **self.params)


# (kernel, stride, pad, dilation, group, offset_scale, remove_center, softmax): regular and
# unequal kernel/padding, strided, dilated, centre removed, offsets that leave the image.
CORE_CASES = [
    dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1, dilation_w=1, group=2,
         offset_scale=1.0, remove_center=False, softmax=True),
    dict(kernel_h=3, kernel_w=5, stride_h=2, stride_w=1, pad_h=0, pad_w=2, dilation_h=2, dilation_w=1, group=3,
         offset_scale=2.0, remove_center=False, softmax=False),
    dict(kernel_h=5, kernel_w=5, stride_h=1, stride_w=2, pad_h=2, pad_w=2, dilation_h=1, dilation_w=1, group=1,
         offset_scale=0.5, remove_center=True, softmax=True),
]


@pytest.mark.parametrize("params", CORE_CASES, ids=["3x3", "3x5-strided-dilated", "5x5-remove-center"])
def test_core_translation_matches_compiled_op(tmp_path, params):
    n, h, w, group_channels = 2, 7, 9, 4
    points = params["kernel_h"] * params["kernel_w"] - int(params["remove_center"])
    ho, wo = ops_dcnv3.dcnv3_output_size(h, w, *(params[k] for k in (
        "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w")))
    g = params["group"]
    inputs = (torch.randn(n, h, w, g * group_channels), torch.randn(n, ho, wo, g * points * 2) * 3,
              torch.randn(n, ho, wo, g * points))
    module = CoreOp(group_channels=group_channels, **params).eval()
    path = tmp_path / "core.onnx"
    batch = torch.export.Dim("batch", min=1, max=8)
    torch.onnx.export(module, inputs, dynamo=True, custom_translation_table=translation_table(), verbose=False,
                      dynamic_shapes=tuple({0: batch} for _ in inputs)).save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {(node.domain or "ai.onnx", node.op_type) for node in model.graph.node}
    assert ("ai.onnx", "GridSample") in ops and all(domain in STANDARD_DOMAINS for domain, _ in ops)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for batch_size in (2, 3):
        x = tuple(torch.randn(batch_size, *t.shape[1:]) * (3 if i == 1 else 1) for i, t in enumerate(inputs))
        expected = module(*x)
        got = torch.from_numpy(session.run(None, dict(zip(names, (t.numpy() for t in x))))[0])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_custom_op_flag_emits_one_plugin_node(tmp_path):
    module = CoreOp(**CORE_CASES[0], group_channels=4).eval()
    inputs = (torch.randn(1, 5, 5, 8), torch.randn(1, 5, 5, 36), torch.randn(1, 5, 5, 18))
    program = torch.export.export(module, inputs)
    path = export_onnx(program, str(tmp_path / "plugin.onnx"), ["output"], custom_op=True)
    report = check_onnx(path, custom_op=True)
    assert report["ops"] == {"ops_dcnv3::DCNv3": 1} and report["opsets"]["ops_dcnv3"] == 1
    node = onnx.load(path).graph.node[0]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["kernel_h"] == 3 and attributes["group"] == 2 and attributes["softmax"] == 1


# The T code path (pre-norm, no layer scale) is exported below as InternImage-T and as the
# tiny UperNet's backbone.
TINY_BACKBONES = {
    # G-style: post-norm with layer scale, depthwise kernel 5, level-2 post norms, centre
    # feature scale, offset scale 2; and DCNv3 without its centre point
    "post-norm": dict(TINY, post_norm=True, layer_scale=0.5, offset_scale=2.0, dw_kernel_size=5,
                      level2_post_norm=True, level2_post_norm_block_ids=[1], center_feature_scale=True,
                      remove_center=True),
    # H-style: pre-norm with res-post-norm, depthwise kernel 5, level-2 post norms, centre feature scale
    "h-style": dict(TINY, dw_kernel_size=5, res_post_norm=True, level2_post_norm=True,
                    level2_post_norm_block_ids=[1], center_feature_scale=True),
}


class SideBySide(torch.nn.Module):
    """Several backbones in one graph: one export instead of several (the exporter's fixed
    cost, not the model size, dominates for tiny models)."""

    def __init__(self, backbones):
        super().__init__()
        self.backbones = torch.nn.ModuleList(backbones)

    def forward(self, x):
        return tuple(feature for backbone in self.backbones for feature in backbone(x))


def test_tiny_backbone_variants_onnx_match_pytorch(tmp_path):
    backbones = [randomize_sampling(InternImage(**kwargs)) for kwargs in TINY_BACKBONES.values()]
    module = SideBySide(backbones).eval()
    with torch.no_grad():  # non-trivial norms and scales
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    names = [f"{name}.feat{i}" for name in TINY_BACKBONES for i in range(4)]
    program = capture(module, random_inputs((40, 48), [2])["random b2"], dynamic_batch=True)
    path = export_onnx(program, str(tmp_path / "backbones.onnx"), names)
    report = check_onnx(path)
    assert report["ops"]["ai.onnx::GridSample"] == len(backbones) * sum(TINY["depths"])
    results = verify_onnx(path, module, random_inputs((40, 48), [1, 3], seed=5), names)
    assert len(results) == 16 and max(r.max_rel for r in results) < 1e-5


def test_internimage_t_classifier_dynamic_batch(tmp_path, capsys):
    """The acceptance command of the issue, with a dynamic batch and a given input."""
    given = tmp_path / "image.npy"
    np.save(given, np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32))
    out = tmp_path / "t.onnx"
    code, results = run_tool("--variant", "t", "--format", "onnx", "--dynamic-batch", "--verify",
                             "--verify-input", given, "--out", out)
    assert code == 0, capsys.readouterr().err
    assert [r.input_name for r in results] == ["random b1", "random b3", "given image.npy"]
    assert all(r.ok and r.max_rel < 1e-4 for r in results)
    model = onnx.load(str(out), load_external_data=False)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # symbolic batch
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 224, 224]
    assert all((node.domain or "ai.onnx") in STANDARD_DOMAINS for node in model.graph.node)
    # Stock onnxruntime, batch 5 (neither the capture's 2 nor the check's 1 and 3).
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.zeros((5, 3, 224, 224), np.float32)})[0].shape == (5, 1000)


def test_tiny_upernet_config_onnx(tmp_path, capsys):
    out = tmp_path / "upernet.onnx"
    code, results = run_tool(ROOT / "tests/configs/upernet_internimage-tiny_shapes.py", "--format", "onnx",
                             "--verify", "--out", out)
    assert code == 0, capsys.readouterr().err
    assert [(r.output_name, r.ok) for r in results] == [("seg_logits", True)]
    model = onnx.load(str(out))
    assert model.graph.output[0].name == "seg_logits"
    # Logits for the 150 ADE20K classes at the input resolution (the config's 64x64 crop).
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 150, 64, 64]


def test_tiny_classification_config_with_an_official_checkpoint(tmp_path, capsys):
    """A classification config (mmpretrain ImageClassifier) with a release-format file
    (``{'model': sd}``, official keys): the class scores, at the test pipeline's crop."""
    model = randomize_sampling(InternImageClassifier(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8],
                                                     num_classes=3, drop_path_rate=0.0))
    checkpoint = tmp_path / "official.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    out = tmp_path / "classifier.onnx"
    code, results = run_tool(ROOT / "tests/configs/internimage-tiny_imagenet-shapes.py", checkpoint, "--format",
                             "onnx", "--verify", "--out", out)
    assert code == 0, capsys.readouterr().err
    assert [(r.output_name, r.ok) for r in results] == [("logits", True)]
    graph = onnx.load(str(out)).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, 32, 32]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(image).numpy()
    np.testing.assert_allclose(session.run(None, {graph.input[0].name: image.numpy()})[0], expected, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_classifier_program():
    """The smallest T-style classifier (AOTInductor compiles C++ for every fused kernel: each
    block adds seconds), captured with a dynamic batch."""
    model = InternImageClassifier(channels=8, depths=[1, 1, 1, 1], groups=[1, 2, 2, 4], mlp_ratio=1.0,
                                  num_classes=5, drop_path_rate=0.0)
    model = randomize_sampling(model).eval()
    return model, capture(model, random_inputs((32, 32), [2])["random b2"], dynamic_batch=True)


def test_exported_program_round_trips_in_fresh_process(tmp_path, tiny_classifier_program):
    model, program = tiny_classifier_program
    path = save_program(program, str(tmp_path / "tiny.pt2"))
    results = verify_package("export", path, model, random_inputs((32, 32), [1, 3]), ["logits"])
    assert [r.input_name for r in results] == ["random b1", "random b3"] and all(r.ok for r in results)


def test_aoti_package_of_tiny_classifier_runs_in_fresh_process(tmp_path, tiny_classifier_program):
    """The package runs in a process that loads only torch and ops_dcnv3/_C*.so."""
    model, program = tiny_classifier_program
    path = compile_aoti(program, str(tmp_path / "tiny_aoti.pt2"))
    results = verify_package("aoti", path, model, random_inputs((32, 32), [1, 3]), ["logits"])
    assert [r.input_name for r in results] == ["random b1", "random b3"] and all(r.ok for r in results)


# --- requests that cannot be served -------------------------------------------

def test_unknown_variant_is_a_clear_error(tmp_path, capsys):
    assert run_tool("--variant", "q", "--format", "onnx", "--out", tmp_path / "q.onnx")[0] == 2
    err = capsys.readouterr().err
    assert "unknown InternImage variant 'q'" in err and "internimage_t" in err


def test_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path, capsys):
    with torch.device("meta"):
        keys = list(build_model("t").state_dict())
    checkpoint = tmp_path / "wrong.pth"
    torch.save({"model": {key: torch.zeros(1) for key in keys}}, checkpoint)  # every name right, no shape
    assert run_tool("--variant", "t", "--checkpoint", checkpoint, "--format", "onnx",
                    "--out", tmp_path / "t.onnx")[0] == 2
    err = capsys.readouterr().err
    assert "shape mismatch for 'patch_embed.conv1.weight'" in err and "(1,)" in err and "(32, 3, 3, 3)" in err
    assert not (tmp_path / "t.onnx").exists()


def test_checkpoint_with_missing_weights_is_refused():
    """Missing weights would be exported as random numbers: refused, naming them."""
    from internimage.deploy.models import _load_complete

    model = InternImage(**TINY)
    state_dict = {k: v for k, v in model.state_dict().items() if not k.startswith("levels.3.")}
    with pytest.raises(ValueError, match=r"lacks \d+ weights of the model, e.g. \['levels.3."):
        _load_complete(InternImage(**TINY), state_dict, "partial.pth")


def test_detector_config_is_refused_with_the_reason(tmp_path, capsys):
    config = ROOT / "tests/configs/mask-rcnn_internimage-tiny_shapes.py"
    assert run_tool(config, "--format", "onnx", "--out", tmp_path / "det.onnx")[0] == 2
    err = capsys.readouterr().err
    assert "MaskRCNN" in err and "data-dependent" in err and "--features" in err


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert run_tool("--variant", "t", "--format", "aoti", "--out", tmp_path / "t.onnx")[0] == 2
    assert "must end with .pt2" in capsys.readouterr().err
    assert run_tool("--format", "onnx", "--out", tmp_path / "t.onnx")[0] == 2
    assert "either --variant" in capsys.readouterr().err
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"\(1, 3, 64, 64\), the export expects \(N, 3, 224, 224\)"):
        export_tool.load_input(str(wrong), (224, 224))


def test_translation_needs_static_height_and_width(tmp_path):
    module = CoreOp(**CORE_CASES[0], group_channels=4).eval()
    inputs = (torch.randn(1, 6, 5, 8), torch.randn(1, 6, 5, 36), torch.randn(1, 6, 5, 18))
    height = torch.export.Dim("height", min=2, max=64)
    program = torch.export.export(module, inputs, dynamic_shapes=tuple({1: height} for _ in inputs))
    with pytest.raises(Exception, match="static height, width"):
        export_onnx(program, str(tmp_path / "dynamic.onnx"), ["output"])
