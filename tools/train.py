"""Train a detector, segmentor or classifier from a config (mmdet 3.x, mmseg 1.x or
mmpretrain 1.x, picked by its scope).

    python tools/train.py CONFIG [--work-dir D] [--resume [CKPT]] [--amp] [--cfg-options k=v ...]
                                 [--launcher none|pytorch|slurm] [--strategy fsdp|deepspeed-zero1|deepspeed-zero3|ddp]
"""
import argparse
import os

import torch
from mmengine.config import Config
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import internimage.datasets  # noqa: F401  (checked datasets, for configs that import only 'internimage')
from internimage.engine.runner_utils import (
    STRATEGIES,
    DictAction,
    apply_common_args,
    apply_strategy,
    check_checkpoint_argument,
    checkpoint_folder,
    find_resume_checkpoint,
    finish_strategy,
    launch_rank,
    load_released_classifier_checkpoints,
    make_training_reliable,
    require_matching_checkpoint,
    teardown_distributed,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a model from a config")
    parser.add_argument("config", help="config file")
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config>)")
    parser.add_argument("--resume", nargs="?", type=str, const="auto",
                        help="resume from CKPT, or without a value from the latest checkpoint in the work dir")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision")
    parser.add_argument("--auto-scale-lr", action="store_true", help="scale the lr by the total batch size")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys, k=v")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--strategy", choices=STRATEGIES + ("ddp",),
                        help="sharded training with mmengine's FlexibleRunner (FSDP or DeepSpeed ZeRO), or ddp: "
                             "the plain Runner; default: the config's strategy, if it states one")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = apply_common_args(Config.fromfile(args.config), args)
    if args.amp:
        if not torch.cuda.is_available():
            raise SystemExit("--amp needs a GPU: mmengine's AmpOptimWrapper supports accelerators only, and mmcv's "
                             "CPU ops (nms, RoIAlign) have no bfloat16 kernels; train in float32 on CPU")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if args.auto_scale_lr:
        cfg.setdefault("auto_scale_lr", {})["enable"] = True
    make_training_reliable(cfg)
    apply_strategy(cfg, args.strategy)
    if args.resume == "auto":
        # The newest *complete* checkpoint (mmengine would take whatever last_checkpoint
        # names); only the first rank removes files left by an interrupted save.
        latest = find_resume_checkpoint(cfg.work_dir, clean=launch_rank() == 0,
                                        checkpoint_dir=checkpoint_folder(cfg)) \
            if os.path.isdir(cfg.work_dir) else None
        if latest is None:
            print(f"--resume: no complete checkpoint in {cfg.work_dir}; training from the start", flush=True)
            cfg.resume = False  # a load_from of the config still applies
        else:
            cfg.resume, cfg.load_from = True, latest
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    check_checkpoint_argument(cfg.get("load_from"))
    runner = RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
    finish_strategy(runner)
    load_released_classifier_checkpoints(runner)  # classifiers: official files as load_from
    # A load_from or resume file that matches no weight of the model is the wrong file.
    require_matching_checkpoint(runner, min_fraction=0.0)
    # On an error the process group is left alone: the teardown's barrier would wait for
    # ranks that are inside another collective (a failure on one rank became a hang of
    # all); the traceback is printed and the launcher stops the other ranks.
    runner.train()
    teardown_distributed()


if __name__ == "__main__":
    main()
