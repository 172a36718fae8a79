"""Nonsense settings are a clear ValueError naming the argument and its value, raised by
the constructors before anything is built, and by the tools before any model is built or
run: never an obscure error deep inside, and never a model that trains anyway."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from internimage import InternImage, InternImageClassifier

REPO = Path(__file__).resolve().parents[1]
TINY = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)

# (override of TINY, pattern the message must match: the argument and its bad value)
BAD_SETTINGS = [
    (dict(drop_path_rate=2), r"drop_path_rate must be a number in \[0, 1\), got 2"),
    (dict(drop_path_rate=1.0), r"drop_path_rate .*got 1\.0"),
    (dict(drop_path_rate=-0.1), r"drop_path_rate .*got -0\.1"),
    (dict(drop_path_rate="0.1"), r"drop_path_rate .*got '0\.1'"),
    (dict(drop_rate=1.5), r"drop_rate .*got 1\.5"),
    (dict(mlp_ratio=0), r"mlp_ratio must be a number > 0, got 0"),
    (dict(mlp_ratio=-4.0), r"mlp_ratio .*got -4\.0"),
    (dict(mlp_ratio=None), r"mlp_ratio .*got None"),
    (dict(mlp_ratio=0.01), r"mlp_ratio=0\.01 gives the MLPs"),
    (dict(depths=[0, 0, 0, 0]), r"depths\[0\] must be an integer >= 1, got 0"),
    (dict(depths=[1, 1, 0, 1]), r"depths\[2\] must be an integer >= 1, got 0"),
    (dict(depths=[1, 1, 1.5, 1]), r"depths\[2\] .*got 1\.5"),
    (dict(depths=[1, 1, 1]), r"depths must have 4 entries .*got 3"),
    (dict(depths=[1, 1, 1, 1, 1], groups=[1, 2, 4, 8, 16]), r"depths must have 4 entries .*got 5"),
    (dict(depths=4), r"depths must be a list of 4 positive integers .*got 4"),
    (dict(groups=[1, 2, 4]), r"groups must have 4 entries .*got 3"),
    (dict(groups=[1, 2, 4, 0]), r"groups\[3\] must be an integer >= 1, got 0"),
    (dict(groups=[3, 6, 12, 24]), r"16 channels .* not divisible by groups\[0\]=3"),
    (dict(channels=24, groups=[1, 2, 4, 7]), r"192 channels .* not divisible by groups\[3\]=7"),
    (dict(channels=0), r"channels must be a positive integer, got 0"),
    (dict(channels=16.5), r"channels .*got 16\.5"),
    (dict(offset_scale=-1.0), r"offset_scale must be a number >= 0, got -1\.0"),
    (dict(offset_scale="large"), r"offset_scale .*got 'large'"),
    (dict(offset_scale=float("nan")), r"offset_scale .*got nan"),
    (dict(offset_scale="2"), r"offset_scale .*got '2'"),
    (dict(layer_scale=-1e-5), r"layer_scale must be None .* or a number >= 0, got -1e-05"),
    (dict(layer_scale="1e-5"), r"layer_scale .*got '1e-5'"),
    (dict(layer_scale=float("inf")), r"layer_scale .*got inf"),
    (dict(out_indices=(0, 4)), r"out_indices must be stage indices in 0\.\.3, got \(0, 4\)"),
    (dict(out_indices=(-1,)), r"out_indices .*got \(-1,\)"),
    (dict(out_indices=()), r"out_indices must name at least one stage"),
    (dict(out_indices=3), r"out_indices must be a sequence .*got 3"),
    (dict(out_indices=(1, 1)), r"out_indices must not repeat a stage, got \(1, 1\)"),
    (dict(frozen_stages=5), r"frozen_stages must be an integer in \[-1, 4\] .*got 5"),
    (dict(frozen_stages=-2), r"frozen_stages .*got -2"),
    (dict(frozen_stages=1.5), r"frozen_stages .*got 1\.5"),
    (dict(dw_kernel_size=4), r"dw_kernel_size must be None or an odd positive integer, got 4"),
    (dict(level2_post_norm=True, level2_post_norm_block_ids=[0, 5]),
     r"level2_post_norm_block_ids .*\[0, 1\), got \[0, 5\]"),
]


def ids(cases):
    return [",".join(f"{k}={v!r}" for k, v in override.items()) for override, _ in cases]


@pytest.mark.parametrize("override,message", BAD_SETTINGS, ids=ids(BAD_SETTINGS))
def test_backbone_rejects_bad_setting(override, message):
    with pytest.raises(ValueError, match=message):
        InternImage(**dict(TINY, **override))


@pytest.mark.parametrize("override,message", BAD_SETTINGS, ids=ids(BAD_SETTINGS))
def test_classifier_rejects_bad_setting(override, message):
    with pytest.raises(ValueError, match=message):
        InternImageClassifier(**dict(TINY, num_classes=3, **override))


BAD_HEADS = [
    (dict(num_classes=-1), r"num_classes must be an integer >= 0 .*got -1"),
    (dict(num_classes=2.5), r"num_classes .*got 2\.5"),
    (dict(cls_scale=0), r"cls_scale must be a number > 0, got 0"),
    (dict(cls_scale="1.5"), r"cls_scale .*got '1\.5'"),
    (dict(cls_scale=1e-4), r"cls_scale=0\.0001 leaves the classification head no channels"),
]


@pytest.mark.parametrize("override,message", BAD_HEADS, ids=ids(BAD_HEADS))
def test_classifier_rejects_bad_head_setting(override, message):
    with pytest.raises(ValueError, match=message):
        InternImageClassifier(**dict(TINY, **override))


def test_bad_setting_is_named_through_the_mmdet_registry():
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    import internimage  # noqa: F401  (registers InternImage)

    init_default_scope("mmdet")
    with pytest.raises(ValueError, match=r"drop_path_rate .*got 2"):
        MODELS.build(dict(type="InternImage", **dict(TINY, drop_path_rate=2)))


@pytest.mark.parametrize("override", [
    dict(), dict(drop_path_rate=0.999), dict(mlp_ratio=0.25), dict(layer_scale=0.0), dict(offset_scale=0.0),
    dict(out_indices=[3, 0]), dict(frozen_stages=4), dict(frozen_stages=-1), dict(dw_kernel_size=5),
    dict(level2_post_norm=True, level2_post_norm_block_ids=[0]),
], ids=lambda o: ",".join(f"{k}={v!r}" for k, v in o.items()) or "tiny")
def test_edge_settings_still_build_and_run(override):
    backbone = InternImage(**dict(TINY, core_op="DCNv3_pytorch", **override)).eval()
    with torch.no_grad():
        outputs = backbone(torch.rand(1, 3, 64, 64))
    assert len(outputs) == len(backbone.out_indices)


def test_classifier_defaults_build():
    """The defaults (InternImage-T's architecture) build a working model."""
    with torch.device("meta"):
        model = InternImageClassifier()
    assert model.depths == [4, 4, 18, 4] and model.num_classes == 1000


def test_flops_shape_is_checked():
    from internimage.checkpoint.flops import check_input_shape, classifier_complexity

    with pytest.raises(ValueError, match=r"height and width must be integers >= 32 .*got 0 x 0"):
        classifier_complexity("t", 0, 0)
    with pytest.raises(ValueError, match=r"got 224 x 16"):
        check_input_shape(224, 16)
    check_input_shape(32, 33)


# --- the tools, as subprocesses -------------------------------------------------------


def run(args, timeout=300):
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("shape", [["0"], ["224", "-5"], ["16"]])
def test_get_flops_rejects_bad_shape(shape):
    code, log = run(["tools/get_flops.py", "--variant", "t", "--shape", *shape])
    assert code != 0
    assert "--shape must be at least 32" in log and f"got {' '.join(shape)}" in log, log[-2000:]
    assert "Traceback" not in log


@pytest.fixture(scope="module")
def detector_files(tmp_path_factory):
    """The tiny test detector's config, a checkpoint of it, and an image."""
    import cv2
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from internimage.datasets.synthetic import render_scene

    root = tmp_path_factory.mktemp("demo")
    config = REPO / "tests" / "configs" / "mask-rcnn_internimage-tiny_shapes.py"
    init_default_scope("mmdet")
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(config)).model)
    model.init_weights()
    checkpoint = root / "tiny.pth"
    torch.save({"state_dict": model.state_dict(),
                "meta": {"dataset_meta": {"classes": ("circle", "square", "triangle")}}}, checkpoint)
    import numpy as np

    image, _ = render_scene(np.random.default_rng(0), 64)
    image_path = root / "shapes.png"
    cv2.imwrite(str(image_path), image[..., ::-1])
    return str(config), str(checkpoint), str(image_path)


def run_demo(image, out_file, detector_files):
    config, checkpoint, _ = detector_files
    return run(["tools/image_demo.py", str(image), config, checkpoint, "--out-file", str(out_file)])


# mmengine logs this when it loads the checkpoint, i.e. after the model is built.
LOADED = "Loads checkpoint"


def test_image_demo_runs(detector_files, tmp_path):
    out = tmp_path / "sub" / "demo.png"
    code, log = run_demo(detector_files[2], out, detector_files)
    assert code == 0, log[-3000:]
    import cv2

    assert cv2.imread(str(out)).shape[:2] == (64, 64)


@pytest.mark.parametrize("content", [b"this is a text file, not an image\n", b""])
def test_image_demo_names_a_non_image_file_before_building_the_model(detector_files, tmp_path, content):
    text = tmp_path / "notes.png"
    text.write_bytes(content)
    out = tmp_path / "out.png"
    code, log = run_demo(text, out, detector_files)
    assert code != 0
    assert f"IMAGE '{text}' is not an image file" in log, log[-2000:]
    assert LOADED not in log and "Traceback" not in log
    assert not out.exists()


def test_image_demo_names_a_missing_image(detector_files, tmp_path):
    code, log = run_demo(tmp_path / "missing.png", tmp_path / "out.png", detector_files)
    assert code != 0 and f"IMAGE '{tmp_path / 'missing.png'}': no such file" in log, log[-2000:]


def unwritable_out_files(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file, not a folder")
    existing_dir = tmp_path / "existing_dir"
    existing_dir.mkdir()
    return {
        "folder under a file": (blocker / "out" / "demo.png", "cannot create the folder"),
        "extension .txt": (tmp_path / "demo.txt", "cannot write images with the extension '.txt'"),
        "no extension": (tmp_path / "demo", "cannot write images with the extension '(none)'"),
        "a folder": (existing_dir, "is a folder"),
    }


@pytest.mark.parametrize("case", ["folder under a file", "extension .txt", "no extension", "a folder"])
def test_image_demo_checks_out_file_before_inference(detector_files, tmp_path, case):
    out, message = unwritable_out_files(tmp_path)[case]
    code, log = run_demo(detector_files[2], out, detector_files)
    assert code != 0
    assert f"--out-file '{out}'" in log and message in log, log[-2000:]
    assert LOADED not in log and "Traceback" not in log  # failed before building the model


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write in read-only folders")
def test_image_demo_checks_out_folder_is_writable(detector_files, tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, log = run_demo(detector_files[2], folder / "demo.png", detector_files)
    finally:
        folder.chmod(0o755)
    assert code != 0 and "cannot write in the folder" in log and LOADED not in log, log[-2000:]
