"""Shared logic of tools/train.py and tools/test.py (kept here so tests can reach it)."""
import contextlib
import glob
import logging
import os
import re
import stat
import subprocess
import zipfile
from typing import Optional

import torch
from mmengine.config import Config, DictAction  # noqa: F401  (re-exported for the tools)
from mmengine.logging import print_log

from .fileio import TMP_MARK


def apply_common_args(cfg: Config, args) -> Config:
    """--cfg-options, --launcher, --work-dir (default: ./work_dirs/<config name>)."""
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
        if any(key.split(".")[0] == "custom_imports" for key in args.cfg_options):
            # Config.fromfile imported the file's custom_imports; import the overridden ones too.
            from mmengine.utils import import_modules_from_strings

            import_modules_from_strings(**cfg.custom_imports)
    cfg.launcher = args.launcher
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = os.path.join("./work_dirs", os.path.splitext(os.path.basename(args.config))[0])
    cfg.setdefault("custom_imports", dict(imports=["internimage", "internimage.engine", "internimage.datasets"],
                                          allow_failed_imports=False))
    if not torch.cuda.is_available():
        replace_sync_bn_with_bn(cfg)
    if args.launcher != "none" and not torch.cuda.is_available():
        setup_cpu_distributed(cfg, args.launcher)
    return cfg


def replace_sync_bn_with_bn(cfg: Config):
    """SyncBN needs a GPU process group; on a CPU machine use BN (same parameters)."""
    def visit(node):
        if isinstance(node, dict):
            if node.get("type") == "SyncBN":
                node["type"] = "BN"
            for value in node.values():
                visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    if "SyncBN" in str(cfg.model):
        visit(cfg.model)
        print_log("No GPU: SyncBN layers of the model are built as BN", logger="current")


def setup_cpu_distributed(cfg: Config, launcher: str):
    """Multi-process training on CPUs with mmengine's launchers.

    mmengine 0.10.7 calls ``torch.cuda.set_device`` while initialising the process group
    and wraps the model in DDP with ``device_ids=[LOCAL_RANK]``; neither works without a
    GPU. So the process group is initialised here (gloo), before the Runner, which then
    finds it ready, and DDP gets ``device_ids=None``.
    """
    import torch.distributed as dist

    dist_cfg = cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})
    if dist_cfg.get("backend", "nccl") != "gloo":
        print_log(f"No GPU: using the gloo process-group backend instead of {dist_cfg.get('backend', 'nccl')}",
                  logger="current")
        dist_cfg["backend"] = "gloo"
    if launcher == "slurm":
        _slurm_environment()
    elif launcher != "pytorch":
        raise ValueError(f"launcher {launcher!r} is not supported on CPU; use 'pytorch' or 'slurm'")
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False,
                                 find_unused_parameters=cfg.get("find_unused_parameters", False))


def _slurm_environment():
    """RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from Slurm's variables (as mmengine does)."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("MASTER_PORT", os.environ.get("PORT", "29500"))
    if "MASTER_ADDR" not in os.environ:
        nodes = subprocess.check_output(["scontrol", "show", "hostname", os.environ["SLURM_NODELIST"]], text=True)
        os.environ["MASTER_ADDR"] = nodes.split()[0]


def teardown_distributed():
    """Destroy the process group before the interpreter exits: a gloo group left alive
    can abort a rank at exit ("terminate called without an active exception"). All ranks
    meet in a barrier first, so none tears down its side of a connection while a peer is
    still finishing the last collective (which aborted a rank in about 1 run out of 5)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


RELIABILITY_HOOKS = ("NonFiniteLossHook", "RandomStateHook")


def _type_name(hook_type) -> str:
    name = hook_type if isinstance(hook_type, str) else getattr(hook_type, "__name__", str(hook_type))
    return name.rsplit(".", 1)[-1]  # 'mmdet.NonFiniteLossHook' -> 'NonFiniteLossHook'


def make_training_reliable(cfg: Config) -> Config:
    """Defaults that make a run safe to kill and to resume (for configs that lack them).

    * checkpoints written to a temporary file and renamed (``local_atomic`` backend), for
      local output folders, unless the checkpoint hook already names a backend;
    * ``NonFiniteLossHook`` (stop on a NaN/Inf loss) and ``RandomStateHook`` (random
      states saved in checkpoints) in ``custom_hooks`` when not there.
    """
    hook = cfg.get("default_hooks", {}).get("checkpoint")
    if hook is not None and _type_name(hook.get("type", "CheckpointHook")) == "CheckpointHook":
        out_dir = hook.get("out_dir") or cfg.work_dir
        if hook.get("backend_args") is None and hook.get("file_client_args") is None and "://" not in out_dir:
            hook["backend_args"] = dict(backend="local_atomic")
    hooks = cfg.get("custom_hooks") or []
    present = {_type_name(h.get("type")) for h in hooks}
    added = [name for name in RELIABILITY_HOOKS if name not in present]
    cfg.custom_hooks = list(hooks) + [dict(type=name) for name in added]
    if added:
        print_log(f"added {', '.join(added)} to custom_hooks", logger="current")
    return cfg


def launch_rank() -> int:
    """This process's global rank as the launcher gives it, before mmengine sets RANK."""
    for variable in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 0


def remove_interrupted_saves(folder: str):
    """Delete the temporary files an interrupted atomic save left in ``folder``.

    Only regular files directly inside it are touched, never what a symlink points to.
    """
    for tmp in glob.glob(os.path.join(glob.escape(folder), f"*.pth{TMP_MARK}*")):
        if not stat.S_ISREG(os.lstat(tmp).st_mode):
            continue
        print_log(f"removing {tmp}: left by a checkpoint save that was interrupted", logger="current")
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


_CKPT_NAME = re.compile(r"^(epoch|iter)_(\d+)\.pth$")


def is_complete_checkpoint(path: str) -> bool:
    """torch.save writes a zip archive whose directory comes last: a truncated file has none."""
    return os.path.isfile(path) and zipfile.is_zipfile(path)


def find_resume_checkpoint(work_dir: str, clean: bool = True, checkpoint_dir: Optional[str] = None
                           ) -> Optional[str]:
    """The checkpoint ``--resume`` continues from: the one ``last_checkpoint`` names if it is
    complete; else (no pointer, an empty one, or one naming a file that a non-atomic save
    left truncated) the most recently written complete ``epoch_N.pth`` / ``iter_N.pth`` in
    the work dir, ``checkpoint_dir`` (where the config's checkpoint hook writes, when that is
    elsewhere) or the folder the pointer names; ``None`` when there is none.

    The pointer comes first although a kill between a save and the pointer's update makes
    it lag one checkpoint behind: a work dir can also hold stale checkpoints of an earlier
    run, which only the pointer tells apart. With ``clean``, temporary files left by an
    interrupted save are removed from the work dir and ``checkpoint_dir``, which the
    config names; never from the folder of the pointer, a file that anything could have
    written."""
    pointer = os.path.join(work_dir, "last_checkpoint")
    named = None
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip() or None
    trusted = {os.path.abspath(work_dir)} | ({os.path.abspath(checkpoint_dir)} if checkpoint_dir else set())
    folders = set(trusted)
    if named:
        folders.add(os.path.dirname(os.path.abspath(named)))
    if clean:
        for folder in sorted(trusted):
            if os.path.isdir(folder):
                remove_interrupted_saves(folder)
    if named and is_complete_checkpoint(named):
        return named
    found = []
    for folder in sorted(folders):
        for path in glob.glob(os.path.join(glob.escape(folder), "*.pth")):
            match = _CKPT_NAME.match(os.path.basename(path))
            if match and is_complete_checkpoint(path):
                found.append((os.path.getmtime(path), int(match.group(2)), path))
    latest = max(found)[2] if found else None
    if named:
        print_log(f"last_checkpoint names {named}, which is missing or incomplete; "
                  f"{'using ' + latest if latest else 'no complete checkpoint found'}", logger="current",
                  level=logging.WARNING)
    return latest


def checkpoint_folder(cfg: Config) -> Optional[str]:
    """Where the config's CheckpointHook writes when it has an ``out_dir`` (mmengine puts the
    files in ``out_dir/<work dir name>``); ``None`` when it writes to the work dir or remotely."""
    hook = cfg.get("default_hooks", {}).get("checkpoint") or {}
    out_dir = hook.get("out_dir")
    if not out_dir or "://" in out_dir:
        return None
    return os.path.join(out_dir, os.path.basename(os.path.normpath(cfg.work_dir)))


def check_checkpoint_argument(filename: Optional[str], verify_hash: Optional[bool] = None):
    """Before a run: a local checkpoint must exist, and match the hash its name carries
    (``NAME-<hex>.pth``); URLs are checked when downloaded."""
    from ..checkpoint import verify_hash_in_name
    from ..checkpoint.hub import hub_folder_of

    if not filename or "://" in filename:
        return
    path = os.path.expanduser(filename)
    if os.path.isdir(path) and hub_folder_of(path) is not None:  # a Hugging Face hub folder
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {filename} not found")
    verify_hash_in_name(path, verify_hash)


def require_matching_checkpoint(runner, min_fraction: float):
    """Make ``runner.load_checkpoint`` fail when the file provides fewer than ``min_fraction``
    of the model's weights (mmengine only warns about missing keys, and a test of the
    wrong file then evaluates a randomly initialised model)."""
    from mmengine.model import is_model_wrapper

    from ..checkpoint import check_coverage, to_state_dict

    load = runner.load_checkpoint

    def load_checked(filename, *args, **kwargs):
        checkpoint = load(filename, *args, **kwargs)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        # The keys as mmengine loads them: the 'state_dict' entry or the whole dict, `module.`
        # prefixes dropped (and from the model's keys: a TTA model's `module.`).
        own = to_state_dict(model.state_dict()).keys()
        found = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
        check_coverage(own, to_state_dict({"state_dict": found}).keys(), filename, min_fraction)
        return checkpoint

    runner.load_checkpoint = load_checked


def load_released_classifier_checkpoints(runner):
    """For an mmpretrain ``ImageClassifier`` with an ``InternImageClsBackbone``: make
    ``runner.load_checkpoint`` (``load_from``, ``--resume``, ``tools/test.py CHECKPOINT``)
    read every format :func:`internimage.build_model` reads (the official ``{'model': sd}``,
    a bare state dict, ``{'state_dict': sd}`` with or without ``backbone.``, a Hugging Face
    hub folder or weights file, ``internimage://`` names, URLs), through the project's safe
    loader (hash in the name checked, ``weights_only=True``). The checkpoint is given to the
    hooks (``after_load_checkpoint``: EMA, random states) and the model as mmengine's
    ``{'state_dict': ..., ...}`` with the model's keys, so nothing needs converting first.
    Other models keep mmengine's loading."""
    from mmengine.model import is_model_wrapper
    from mmengine.runner.checkpoint import _load_checkpoint_to_model

    from ..checkpoint import load_file, to_state_dict
    from ..models.mmpretrain_wrapper import InternImageClsBackbone, to_image_classifier_keys

    def unwrap(model):
        model = model.module if is_model_wrapper(model) else model
        return getattr(model, "module", model)  # a TTA model wraps the classifier as `module`

    if not isinstance(getattr(unwrap(runner.model), "backbone", None), InternImageClsBackbone):
        return

    def load_any(filename, map_location="cpu", strict=False, revise_keys=[(r"^module\.", "")]):  # noqa: B006
        checkpoint = load_file(filename, map_location=map_location)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            checkpoint = {"state_dict": to_state_dict(checkpoint),
                          "meta": (checkpoint.get("meta") or {}) if isinstance(checkpoint, dict) else {}}
        checkpoint["state_dict"] = to_image_classifier_keys(to_state_dict(checkpoint))
        runner.call_hook("after_load_checkpoint", checkpoint=checkpoint)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        checkpoint = _load_checkpoint_to_model(model, checkpoint, strict, revise_keys=revise_keys)
        runner._has_loaded = True
        runner.logger.info(f"Load checkpoint from {filename}")
        return checkpoint

    runner.load_checkpoint = load_any


STRATEGIES = ("fsdp", "deepspeed-zero1", "deepspeed-zero3")


def apply_strategy(cfg: Config, name: Optional[str]) -> Config:
    """``tools/train.py --strategy NAME``: train with mmengine's ``FlexibleRunner`` and a
    sharding strategy (the sharding itself is mmengine's and PyTorch's / DeepSpeed's).

    * ``fsdp``: ``FSDPStrategy`` (as ``InternImageFSDPStrategy``, which fixes its resume;
      parameters, gradients and optimizer state sharded, i.e. ZeRO-3), ``use_orig_params=True``
      so the optimizer keeps the per-parameter groups of the layer-decay constructor (an
      ``EMAHook`` is refused: with it the run hangs at its first checkpoint), and
      ``state_dict_cfg='full'``: rank 0 writes one plain checkpoint file (what ``--resume``
      and ``tools/publish_model.py`` read);
    * ``deepspeed-zero1`` / ``deepspeed-zero3``: ``DeepSpeedStrategy`` with that ZeRO stage
      (needs ``pip install deepspeed``).

    ``optim_wrapper`` (and its ``constructor``/``paramwise_cfg``) and ``custom_hooks`` stay
    as they are: FlexibleRunner builds the optimizer after wrapping the model. Without a
    name the config is returned unchanged (a config's own ``strategy`` key then selects
    FlexibleRunner, as in mmengine)."""
    if name is None:
        if "strategy" in cfg and "runner_type" not in cfg:
            cfg.runner_type = "FlexibleRunner"
        return cfg
    if name not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
    if name == "fsdp":
        if any(_type_name(h.get("type")) == "EMAHook" for h in cfg.get("custom_hooks") or []):
            raise SystemExit("--strategy fsdp: the config's EMAHook does not work under FSDP (the run hangs at "
                             "its first checkpoint); remove it from custom_hooks")
        strategy = dict(type="InternImageFSDPStrategy", model_wrapper=dict(type="MMFullyShardedDataParallel",
                                                                use_orig_params=True),
                        state_dict_cfg="full")
    else:
        try:
            import deepspeed  # noqa: F401
        except ImportError as error:
            raise SystemExit(f"--strategy {name} needs DeepSpeed, which is not installed: "
                             f"pip install deepspeed ({error})") from error
        strategy = deepspeed_strategy(cfg, int(name[-1]))
    cfg.runner_type = "FlexibleRunner"
    cfg.strategy = strategy
    if name != "fsdp":
        # DeepSpeed's engine does the optimizer step (and loss scaling) itself.
        cfg.optim_wrapper.type = "DeepSpeedOptimWrapper"
        cfg.optim_wrapper.pop("loss_scale", None)
    print_log(f"--strategy {name}: FlexibleRunner with {strategy['type']}", logger="current")
    return cfg


def deepspeed_strategy(cfg: Config, stage: int) -> dict:
    """mmengine's ``DeepSpeedStrategy`` config for ZeRO ``stage`` (1 or 3); the config's
    gradient clipping and AMP (``AmpOptimWrapper`` -> bf16) carry over."""
    optim = cfg.get("optim_wrapper", {})
    strategy = dict(type="DeepSpeedStrategy", zero_optimization=dict(
        stage=stage, overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=int(5e8)))
    if stage == 3:
        strategy["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=True)
    clip = (optim.get("clip_grad") or {}).get("max_norm")
    if clip is not None:
        strategy["gradient_clipping"] = clip
    if "Amp" in str(optim.get("type", "")):
        strategy["bf16"] = dict(enabled=True)
    return strategy


def finish_strategy(runner):
    """After ``FlexibleRunner`` is built, before it wraps the model: on a CPU machine FSDP
    keeps the parameters on the CPU (mmengine's default ``device_id`` is ``LOCAL_RANK``, a
    CUDA device)."""
    wrapper = getattr(getattr(runner, "strategy", None), "model_wrapper", None)
    if isinstance(wrapper, dict) and not torch.cuda.is_available():
        wrapper["device_id"] = torch.device("cpu")


def _register_fsdp_strategy():
    from mmengine._strategy import FSDPStrategy
    from mmengine.registry import STRATEGIES as STRATEGY_REGISTRY
    from torch.distributed.fsdp import FullyShardedDataParallel

    @STRATEGY_REGISTRY.register_module(force=True)
    class InternImageFSDPStrategy(FSDPStrategy):
        """mmengine's ``FSDPStrategy`` with ``--resume`` working on PyTorch 2.x: mmengine
        0.10.7 passes ``FSDP.optim_state_dict_to_load`` its arguments in the PyTorch 1.x
        order (state dict first), which fails with "unhashable type: 'dict'"."""

        def load_optim_state_dict(self, state_dict: dict) -> None:
            optimizer = self.optim_wrapper.optimizer
            state_dict = FullyShardedDataParallel.optim_state_dict_to_load(self.model, optimizer, state_dict)
            self.optim_wrapper.load_state_dict(state_dict)

    return InternImageFSDPStrategy


InternImageFSDPStrategy = _register_fsdp_strategy()
