"""Evaluate a checkpoint on a config's test set (mmdet 3.x, mmseg 1.x or mmpretrain 1.x).

    python tools/test.py CONFIG CHECKPOINT [--work-dir D] [--out F] [--show-dir D] [--tta]
                         [--cfg-options k=v ...] [--launcher none|pytorch|slurm]

CHECKPOINT may be this project's, an mmdet 2.x / mmseg 0.x one, or a path/URL. It is read
with ``weights_only=True``; a name ``NAME-<hex>.pth`` must match the file's sha256 (set
INTERNIMAGE_VERIFY_HASH=0 to skip that), and a file that provides fewer than half of the
model's weights is refused (evaluating it would measure a randomly initialised model).
For the classification configs it may also be an official classification release as
published (``{'model': state_dict}``) or any other format ``internimage.build_model`` reads:
it is mapped to the classifier's keys when loaded. ``--tta`` evaluates with the config's
``tta_model`` / ``tta_pipeline`` (for the classification configs: the average of the scores
of the image and its horizontal flip).
"""
import argparse
import os

from mmengine.config import Config
from mmengine.evaluator import DumpResults
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import internimage.datasets  # noqa: F401  (checked datasets, for configs that import only 'internimage')
from internimage.engine.runner_utils import (
    DictAction,
    apply_common_args,
    check_checkpoint_argument,
    load_released_classifier_checkpoints,
    require_matching_checkpoint,
    teardown_distributed,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Test a checkpoint")
    parser.add_argument("config", help="config file")
    parser.add_argument("checkpoint", help="checkpoint file or URL")
    parser.add_argument("--work-dir", help="where the metrics are written")
    parser.add_argument("--out", help="dump the raw predictions to this .pkl file")
    parser.add_argument("--show-dir", help="save images with predictions drawn under this folder")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (the config's tta_model)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys, k=v")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def enable_visualization(cfg, show_dir):
    hook = cfg.default_hooks.get("visualization")
    if hook is None:
        raise KeyError("the config has no default_hooks.visualization to draw predictions with")
    hook["draw"] = True
    hook["interval"] = 1
    if cfg.get("default_scope") == "mmseg":  # SegVisualizationHook saves through the visualizer
        cfg.visualizer["save_dir"] = show_dir
    else:
        hook["test_out_dir"] = os.path.abspath(show_dir)


def enable_tta(cfg):
    """Wrap the model in the config's ``tta_model`` and test with its ``tta_pipeline``."""
    if "tta_model" not in cfg or "tta_pipeline" not in cfg:
        raise KeyError("--tta needs tta_model and tta_pipeline in the config")
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.model = dict(**cfg.tta_model, module=cfg.model)


def main(argv=None):
    args = parse_args(argv)
    check_checkpoint_argument(args.checkpoint)
    cfg = apply_common_args(Config.fromfile(args.config), args)
    cfg.load_from = args.checkpoint
    if args.show_dir:
        enable_visualization(cfg, args.show_dir)
    if args.tta:
        enable_tta(cfg)
    runner = RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
    load_released_classifier_checkpoints(runner)
    require_matching_checkpoint(runner, min_fraction=0.5)
    if args.out:
        if not args.out.endswith((".pkl", ".pickle")):
            raise ValueError(f"--out must be a .pkl file, got {args.out}")
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    try:
        return runner.test()
    finally:
        teardown_distributed()


if __name__ == "__main__":
    main()
