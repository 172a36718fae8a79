"""The README's fine-tuning commands, run as written: parsed out of README.md (so the test
breaks when the README and the code diverge), with a tiny published checkpoint in place
of the file name, synthetic data, and one training iteration."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import internimage  # noqa: F401
from internimage.datasets.synthetic import make_coco_shapes

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
QUICKSTART = REPO / "configs" / "quickstart" / "mask-rcnn_internimage-mini_shapes.py"
# One iteration on two images, nothing learnt (lr 0): every weight of the saved checkpoint
# is then exactly what was loaded, or what the model was initialised with.
ONE_STEP = ["train_cfg.max_epochs=1", "train_dataloader.batch_size=2", "val_dataloader.batch_size=1",
            "optim_wrapper.optimizer.lr=0.0", "default_hooks.checkpoint.interval=1", "default_hooks.logger.interval=1"]


def readme_train_command(marker):
    """The README's one indented ``.venv/bin/python tools/train.py ...`` line containing ``marker``."""
    commands = [line.strip() for line in README.read_text().splitlines()
                if re.match(r"\s+\.venv/bin/python tools/train\.py ", line) and marker in line]
    assert len(commands) == 1, f"expected one README train command with {marker!r}, found {commands}"
    return commands[0]


def as_test_command(command, checkpoint, work_dir):
    """The README command with this Python, ``checkpoint`` for the README's file name, and
    a work dir and the one-step options appended."""
    args = shlex.split(command)
    assert args[:2] == [".venv/bin/python", "tools/train.py"], command
    args[0] = sys.executable
    replaced = 0
    for i, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if sep and value.endswith(".pth"):
            assert value.startswith("work_dirs/quickstart/published/mask-rcnn_internimage-mini_shapes-"), value
            args[i] = f"{key}={checkpoint}"
            replaced += 1
    assert replaced == 1, f"no checkpoint file name to replace in {command!r}"
    return args + ["--work-dir", str(work_dir), "--cfg-options", *ONE_STEP]


def build_quickstart_detector():
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    return MODELS.build(Config.fromfile(str(QUICKSTART)).model)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A quickstart detector's weights (every one shifted off any fresh initialisation),
    published the way tools/publish_model.py does: ``NAME-<sha256[:8]>.pth``."""
    from internimage.checkpoint.publish import publish_checkpoint

    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(1234)
    model = build_quickstart_detector()
    model.init_weights()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.001)
    raw = root / "trained.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, raw)
    path = publish_checkpoint(str(raw), str(root / "published" / "mask-rcnn_internimage-mini_shapes"))
    return Path(path), torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme_shapes")
    make_coco_shapes(str(root), num_train=2, num_val=1, size=64, seed=3)
    return str(root) + "/"


def run_readme_command(marker, published, shapes_data, tmp_path):
    checkpoint, _ = published
    work_dir = tmp_path / "work"
    args = as_test_command(readme_train_command(marker), checkpoint, work_dir)
    env = dict(os.environ, INTERNIMAGE_SHAPES_COCO=shapes_data, PYTHONUNBUFFERED="1")
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    trained = torch.load(work_dir / "epoch_1.pth", weights_only=True)["state_dict"]
    return trained, log


def test_readme_backbone_only_fine_tune_command_runs(published, shapes_data, tmp_path):
    trained, log = run_readme_command("model.backbone.init_cfg", published, shapes_data, tmp_path)
    _, weights = published
    backbone = [k for k in weights if k.startswith("backbone.")]
    assert backbone
    for key in backbone:  # loaded exactly
        assert torch.equal(trained[key], weights[key]), key
    for key in weights:  # the rest: not loaded
        if not key.startswith("backbone."):
            assert not torch.equal(trained[key], weights[key]), key


def test_readme_whole_detector_fine_tune_command_runs(published, shapes_data, tmp_path):
    trained, log = run_readme_command("load_from=", published, shapes_data, tmp_path)
    _, weights = published
    assert trained.keys() == weights.keys()
    for key in weights:
        assert torch.equal(trained[key], weights[key]), key


def test_quickstart_backbone_without_checkpoint_trains_from_scratch():
    """The quickstart's init_cfg slot, Pretrained with checkpoint None, loads nothing and
    initialises exactly as init_cfg=None does (the default `make demo` run)."""
    from mmdet.registry import MODELS

    cfg = Config.fromfile(str(QUICKSTART))
    assert cfg.model.backbone.init_cfg == dict(type="Pretrained", checkpoint=None)
    init_default_scope("mmdet")
    torch.manual_seed(0)
    slot = MODELS.build(cfg.model)
    slot.init_weights()
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    plain = MODELS.build(cfg.model)
    plain.init_weights()
    expected = plain.state_dict()
    for key, value in slot.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_backbone_checkpoint_option_merges_into_the_quickstart_config():
    """``--cfg-options model.backbone.init_cfg.checkpoint=PATH`` (the README's form) merges
    into the quickstart config; mmengine cannot merge it into ``init_cfg=None``."""
    cfg = Config.fromfile(str(QUICKSTART))
    cfg.merge_from_dict({"model.backbone.init_cfg.checkpoint": "some.pth"})
    assert cfg.model.backbone.init_cfg == dict(type="Pretrained", checkpoint="some.pth")
