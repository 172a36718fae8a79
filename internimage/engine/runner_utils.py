"""Shared logic of tools/train.py and tools/test.py (kept here so tests can reach it)."""
import contextlib
import functools
import glob
import itertools
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
    """torch.save writes a zip archive whose directory comes last: a truncated file has none.

    A folder is the checkpoint of a DeepSpeed run (``mp_rank_00_model_states.pt`` and one
    ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank) or of FSDP with ``local``
    state dicts (``rank<r>.pth``): complete when every such file is, and there is one per
    rank of the run (``WORLD_SIZE``, when set: a resume needs the same number)."""
    if os.path.isfile(path):
        return zipfile.is_zipfile(path)
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    if "mp_rank_00_model_states.pt" in names:
        ranks = [n for n in names if re.fullmatch(r"zero_pp_rank_\d+_mp_rank_00_optim_states\.pt", n)]
        files = ["mp_rank_00_model_states.pt"] + ranks
    else:
        ranks = files = [n for n in names if re.fullmatch(r"rank\d+\.pth", n)]
    world = os.environ.get("WORLD_SIZE")
    if not ranks or (world and world.isdigit() and len(ranks) != int(world)):
        return False
    return all(zipfile.is_zipfile(os.path.join(path, n)) for n in files)


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
    if os.path.isdir(path) and (hub_folder_of(path) is not None  # a Hugging Face hub folder
                                or is_complete_checkpoint(path)):  # a DeepSpeed / sharded checkpoint
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
        # FlexibleRunner's strategies take the weights out of the checkpoint they return:
        # their keys are recorded on the way in.
        strategy, seen = getattr(runner, "strategy", None), {}
        original = getattr(strategy, "load_model_state_dict", None)
        if original is not None:
            def record(state_dict, *a, **k):
                seen["keys"] = list(state_dict)
                return original(state_dict, *a, **k)

            strategy.load_model_state_dict = record
        try:
            checkpoint = load(filename, *args, **kwargs)
        finally:
            if original is not None:
                del strategy.load_model_state_dict
        sharded = _fsdp_model(runner)
        if sharded is not None:
            own = _unwrapped_names(sharded)  # FSDP's state_dict() would be a collective
        else:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            # The keys as mmengine loads them: the 'state_dict' entry or the whole dict, `module.`
            # prefixes dropped (and from the model's keys: a TTA model's `module.`).
            own = to_state_dict(model.state_dict()).keys()
        found = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
        found = seen.get("keys") or to_state_dict({"state_dict": found}).keys()
        check_coverage(own, found, filename, min_fraction)
        return checkpoint

    runner.load_checkpoint = load_checked


def _fsdp_model(runner):
    """The runner's model when FSDP wraps it (FlexibleRunner with an FSDP strategy), else None."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return runner.model if isinstance(runner.model, FullyShardedDataParallel) else None


def _unwrapped_names(model) -> set:
    """The state-dict names of an FSDP model's weights and buffers, without the wrappers' prefixes."""
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return {re.sub(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.", "", n) for n in names}


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
        sharded = _fsdp_model(runner)
        if sharded is not None:  # through FSDP (full state dict): each rank takes its shards
            state_dict = checkpoint["state_dict"]
            for pattern, replacement in revise_keys:
                state_dict = {re.sub(pattern, replacement, k): v for k, v in state_dict.items()}
            sharded.load_state_dict(state_dict, strict=strict)
        else:
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

    * ``fsdp``: :func:`fsdp_strategy` (``InternImageFSDPStrategy``: parameters, gradients
      and optimizer state sharded, i.e. ZeRO-3; ``use_orig_params=True`` so the optimizer
      keeps the per-parameter groups of the layer-decay constructor; ``state_dict_cfg='full'``:
      rank 0 writes one plain checkpoint file, atomically, which ``--resume`` and
      ``tools/publish_model.py`` read); an ``EMAHook`` becomes ``ShardedEMAHook``;
    * ``deepspeed-zero1`` / ``deepspeed-zero3``: mmengine's ``DeepSpeedStrategy`` with that
      ZeRO stage (as ``InternImageDeepSpeedStrategy``; needs ``pip install deepspeed``;
      checkpoints are folders; configs with an ``EMAHook`` are refused);
    * ``ddp``: the plain ``Runner`` (DDP), also for a config that states a strategy.

    ``optim_wrapper`` (and its ``constructor``/``paramwise_cfg``) stays as it is:
    FlexibleRunner builds the optimizer after wrapping the model. Without a name, a config
    that states a ``strategy`` trains with FlexibleRunner and it (the H and G configs do);
    with one process (no ``--launcher``) such a strategy is dropped, as sharding needs
    several; a config without one is returned unchanged."""
    if name == "ddp" or (name is None and cfg.get("strategy") is not None and cfg.get("launcher", "none") == "none"):
        if cfg.get("strategy") is not None:
            why = "--strategy ddp" if name else "one process (no --launcher)"
            print_log(f"{why}: the config's strategy ({cfg.strategy.get('type')}) is not used", logger="current")
        cfg.pop("strategy", None)
        if cfg.get("runner_type") == "FlexibleRunner":
            cfg.pop("runner_type")
        return cfg
    if name is None:
        if cfg.get("strategy") is not None:
            cfg.setdefault("runner_type", "FlexibleRunner")
            use_sharded_ema(cfg)
            if "DeepSpeed" in str(cfg.strategy.get("type", "")):
                _prepare_deepspeed(cfg)
            print_log(f"the config's strategy: FlexibleRunner with {cfg.strategy.get('type')}", logger="current")
        return cfg
    if name not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES + ('ddp',))}, got {name!r}")
    if name == "fsdp":
        strategy = fsdp_strategy()
    else:
        strategy = deepspeed_strategy(cfg, int(name[-1]))
    cfg.runner_type = "FlexibleRunner"
    cfg.strategy = strategy
    use_sharded_ema(cfg)
    if name != "fsdp":
        _prepare_deepspeed(cfg, name)
    print_log(f"--strategy {name}: FlexibleRunner with {strategy['type']}", logger="current")
    return cfg


def internimage_block_wrap_policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int = 0,
                                  **kwargs) -> bool:
    """FSDP auto-wrap policy: each InternImage block its own FSDP unit. With the whole model
    one unit, FSDP gathers all weights for the forward and holds all gradients before the
    reduce-scatter: the peak is DDP's weights and gradients, and full sharding saves only
    the optimizer state. Per block, one block's weights are gathered at a time."""
    from ..models.backbone import InternImageBlock

    return True if recurse else isinstance(module, InternImageBlock)


def fsdp_strategy() -> dict:
    """The FSDP strategy of ``--strategy fsdp`` (and of the H/G configs that state it).

    ``sync_module_states``: rank 0's initial weights on every rank, as DDP broadcasts them
    (with ``diff_rank_seed`` each rank initialises differently, and each shard would come
    from another rank's initialisation); ``auto_wrap_policy``: one FSDP unit per backbone
    block (:func:`internimage_block_wrap_policy`)."""
    return dict(type="InternImageFSDPStrategy", state_dict_cfg="full",
                model_wrapper=dict(type="MMFullyShardedDataParallel", use_orig_params=True,
                                   sync_module_states=True,
                                   auto_wrap_policy=dict(type="internimage_block_wrap_policy")))


def use_sharded_ema(cfg: Config) -> Config:
    """Under an FSDP strategy, an ``EMAHook`` of ``custom_hooks`` (mmengine's or mmpretrain's)
    becomes ``ShardedEMAHook`` with the same arguments. mmengine's hook averages the model's
    parameters as the rank sees them, which under FSDP are this rank's shards, then writes
    them into the checkpoint's full state dict by name: on every rank but the first, whose
    state dict is empty under ``rank0_only``, that raised a KeyError while rank 0 waited in
    the next collective (the hang at the first checkpoint)."""
    strategy = cfg.get("strategy") or {}
    if "FSDP" not in str(strategy.get("type", "")):
        return cfg
    for hook in cfg.get("custom_hooks") or []:
        if _type_name(hook.get("type")) == "EMAHook":
            hook["type"] = "ShardedEMAHook"
            print_log("FSDP: EMAHook replaced by ShardedEMAHook (the average of this rank's shards)",
                      logger="current")
    return cfg


def _prepare_deepspeed(cfg: Config, flag: str = "the config's strategy") -> None:
    """What a DeepSpeed strategy needs besides the strategy config: DeepSpeed itself (a clear
    error without it), ``DeepSpeedOptimWrapper`` (DeepSpeed's engine does the optimizer step,
    loss scaling and gradient clipping, the last from its ``gradient_clipping``, which
    :func:`deepspeed_strategy` takes from ``clip_grad``), and mmengine 0.10.7 working with
    DeepSpeed >= 0.17, which removed the 1-bit optimizers mmengine imports to register."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"{'--strategy ' + flag if flag.startswith('deepspeed') else flag} needs DeepSpeed, "
                         f"which is not installed: pip install deepspeed ({error})") from error
    _register_missing_deepspeed_onebit()
    _register_deepspeed_strategy()
    if cfg.strategy.get("type") == "DeepSpeedStrategy":
        cfg.strategy["type"] = "InternImageDeepSpeedStrategy"
        # FlexibleRunner fills this in for the type named DeepSpeedStrategy only.
        cfg.strategy.setdefault("train_micro_batch_size_per_gpu",
                                (cfg.get("train_dataloader") or {}).get("batch_size") or 1)
    if any(_type_name(h.get("type")) == "EMAHook" for h in cfg.get("custom_hooks") or []):
        raise SystemExit("EMAHook is not supported with DeepSpeed here: mmengine's DeepSpeedStrategy passes no "
                         "state dict to the checkpoint hooks (the EMA weights would not be saved) and loads "
                         "checkpoints before EMAHook exists; use --strategy fsdp (ShardedEMAHook) or remove it")
    clip = (cfg.optim_wrapper.get("clip_grad") or {}).get("max_norm")
    if clip is not None and "gradient_clipping" not in cfg.strategy:
        cfg.strategy["gradient_clipping"] = clip
    cfg.optim_wrapper.type = "DeepSpeedOptimWrapper"
    cfg.optim_wrapper.pop("loss_scale", None)
    cfg.optim_wrapper.pop("clip_grad", None)


def _register_deepspeed_strategy():
    """``InternImageDeepSpeedStrategy``: mmengine's ``DeepSpeedStrategy`` calling the hooks'
    ``before_save_checkpoint`` / ``after_load_checkpoint`` (mmengine 0.10.7 ignores its
    ``callback`` argument): without them ``RandomStateHook``'s random states were neither
    saved nor restored, and a resumed run drew other numbers than an uninterrupted one. The
    hooks see DeepSpeed's client state (meta, message hub, their own entries), not weights."""
    from mmengine._strategy import DeepSpeedStrategy
    from mmengine.registry import STRATEGIES as STRATEGY_REGISTRY

    if "InternImageDeepSpeedStrategy" in STRATEGY_REGISTRY.module_dict:
        return STRATEGY_REGISTRY.get("InternImageDeepSpeedStrategy")

    @STRATEGY_REGISTRY.register_module()
    class InternImageDeepSpeedStrategy(DeepSpeedStrategy):
        def save_checkpoint(self, filename, *, save_optimizer=True, save_param_scheduler=True, extra_ckpt=None,
                            callback=None):
            extra_ckpt = dict(extra_ckpt or {})
            if callback is not None:
                callback(extra_ckpt)
            super().save_checkpoint(filename, save_optimizer=save_optimizer,
                                    save_param_scheduler=save_param_scheduler, extra_ckpt=extra_ckpt)

        def resume(self, filename, *, resume_optimizer=True, resume_param_scheduler=True, map_location="default",
                   callback=None):
            extra_ckpt = super().resume(filename, resume_optimizer=resume_optimizer,
                                        resume_param_scheduler=resume_param_scheduler, map_location=map_location)
            if callback is not None:
                callback(extra_ckpt)
            return extra_ckpt

        def load_checkpoint(self, filename, *, map_location="cpu", strict=False,
                            revise_keys=[(r"^module.", "")], callback=None):  # noqa: B006
            extra_ckpt = super().load_checkpoint(filename, map_location=map_location, strict=strict,
                                                 revise_keys=revise_keys)
            if callback is not None:
                callback(extra_ckpt)
            return extra_ckpt

    return InternImageDeepSpeedStrategy


def _register_missing_deepspeed_onebit() -> None:
    """mmengine's DeepSpeedStrategy imports ``deepspeed.runtime.fp16.onebit`` (OnebitAdam,
    OnebitLamb, ZeroOneAdam) to register them as optimizer types; DeepSpeed 0.17+ has no
    such module, and building the strategy failed with ModuleNotFoundError. A stand-in
    module whose classes say so when used lets everything else work."""
    import importlib
    import sys
    import types

    name = "deepspeed.runtime.fp16.onebit"
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    module = types.ModuleType(name)
    for optimizer in ("OnebitAdam", "OnebitLamb", "ZeroOneAdam"):
        def unavailable(*args, _name=optimizer, **kwargs):
            raise RuntimeError(f"{_name} is not in the installed DeepSpeed (removed in 0.17)")
        setattr(module, optimizer, type(optimizer, (), {"__init__": unavailable}))
    sys.modules[name] = module


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


def _clip_sharded_grad_norm(optim_wrapper, model) -> None:
    """``OptimWrapper._clip_grad`` for an FSDP model: mmengine calls
    ``torch.nn.utils.clip_grad_norm_`` on the optimizer's parameters, which under FSDP are
    this rank's shards, so each rank clipped by the norm of its own shard (and the log
    showed rank 0's). FSDP's ``clip_grad_norm_`` (a collective: every rank calls it, also
    one whose shard holds no gradient) uses the norm of the whole gradient, as DDP does."""
    kwargs = optim_wrapper.clip_grad_kwargs
    norm = model.clip_grad_norm_(kwargs["max_norm"], kwargs.get("norm_type", 2.0))
    optim_wrapper.message_hub.update_scalar(f"train/{optim_wrapper.grad_name}", float(norm))


def _register_fsdp_strategy():
    from mmengine._strategy import FSDPStrategy
    from mmengine.optim import BaseOptimWrapper, OptimWrapperDict
    from mmengine.registry import STRATEGIES as STRATEGY_REGISTRY
    from torch.distributed.fsdp import FullyShardedDataParallel

    @STRATEGY_REGISTRY.register_module(force=True)
    class InternImageFSDPStrategy(FSDPStrategy):
        """mmengine's ``FSDPStrategy`` with

        * ``sync_module_states`` on CPU too (a broadcast before wrapping);
        * ``--resume`` working on PyTorch 2.x: mmengine 0.10.7 passes
          ``FSDP.optim_state_dict_to_load`` its arguments in the PyTorch 1.x order (state
          dict first), which fails with "unhashable type: 'dict'";
        * the parameter groups of mmengine's optimizer constructor right (``flat_decay_mult``
          took every parameter for a one-dimensional one, see ``build_optim_wrapper``);
        * gradient clipping by the norm of the whole gradient (``_clip_sharded_grad_norm``);
        * on a machine without GPU, full optimizer state dicts that are right (see
          ``_init_state_dict_cfg``): with PyTorch's CPU offload every AdamW state of a
          parameter was saved as ``exp_avg_sq``, so a resumed run diverged; and the optim
          wrapper's base learning rate kept in them, as in a DDP checkpoint;
        * checkpoints written atomically (``local_atomic``: temporary file, fsync, rename),
          as the ``CheckpointHook`` of a DDP run writes them: ``FlexibleRunner`` does not
          pass the hook's ``backend_args`` on, and mmengine's local backend writes into the
          final name, so a process killed while saving left a truncated ``epoch_N.pth``.
        """

        def _wrap_model(self, model):
            wrapper = self.model_wrapper or {}
            if wrapper.get("sync_module_states") and not torch.cuda.is_available():
                # PyTorch's sync_module_states needs GPU tensors: broadcast here instead.
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    with torch.no_grad():
                        for tensor in itertools.chain(model.parameters(), model.buffers()):
                            dist.broadcast(tensor, src=0)
                self.model_wrapper = dict(wrapper, sync_module_states=False)
            return super()._wrap_model(model)

        def _init_state_dict_cfg(self, state_dict_cfg) -> None:
            super()._init_state_dict_cfg(state_dict_cfg)
            config = self.optim_state_dict_config
            if not torch.cuda.is_available() and getattr(config, "offload_to_cpu", False):
                # PyTorch gathers each optimizer state (exp_avg, exp_avg_sq, ...) into one
                # reused buffer and "offloads" it with .cpu(), which on a CPU device returns
                # the buffer itself: every state of a parameter came out as the last one
                # gathered (the checkpoint's exp_avg was exp_avg_sq). Without the offload it
                # clones; on a CPU machine that is the same memory.
                config.offload_to_cpu = False

        def save_checkpoint(self, filename: str, *, save_optimizer: bool = True,
                            save_param_scheduler: bool = True, extra_ckpt: Optional[dict] = None,
                            callback=None) -> None:
            from mmengine.runner import checkpoint as checkpoint_module

            if "://" in str(filename) or not self._is_full_state_dict():
                # Remote files, or one file per rank in a folder ('local' state dicts).
                return super().save_checkpoint(filename, save_optimizer=save_optimizer,
                                               save_param_scheduler=save_param_scheduler,
                                               extra_ckpt=extra_ckpt, callback=callback)
            save = checkpoint_module.save_checkpoint

            def save_atomically(checkpoint, path, **kwargs):
                kwargs.pop("backend_args", None)
                save(checkpoint, path, backend_args=dict(backend="local_atomic"), **kwargs)

            # FSDPStrategy.save_checkpoint gathers the state dicts (a collective on every
            # rank) and has rank 0 call mmengine's save_checkpoint, looked up at call time.
            checkpoint_module.save_checkpoint = save_atomically
            try:
                super().save_checkpoint(filename, save_optimizer=save_optimizer,
                                        save_param_scheduler=save_param_scheduler, extra_ckpt=extra_ckpt,
                                        callback=callback)
            finally:
                checkpoint_module.save_checkpoint = save

        def build_optim_wrapper(self, optim_wrapper, model=None):
            model = model if model is not None else getattr(self, "model", None)
            shapes = contextlib.nullcontext()
            if isinstance(model, FullyShardedDataParallel) and not isinstance(optim_wrapper, BaseOptimWrapper):
                # Outside forward, FSDP's parameters are 1-D views of this rank's shard:
                # mmengine's constructor would take every one for a norm or bias
                # (flat_decay_mult applied to all: no weight decay anywhere). Built with
                # the full parameters in place (gathered for the moment, not written back).
                shapes = FullyShardedDataParallel.summon_full_params(model, writeback=False)
            with shapes:
                wrapper = super().build_optim_wrapper(optim_wrapper, model)
            wrappers = wrapper.values() if isinstance(wrapper, OptimWrapperDict) else [wrapper]
            for each in wrappers:
                if getattr(each, "clip_grad_kwargs", None) and getattr(each, "grad_name", "") == "grad_norm":
                    each._clip_grad = functools.partial(_clip_sharded_grad_norm, each, model)
            return wrapper

        def optim_state_dict(self) -> dict:
            # FSDP's optimizer state dict keeps 'state' and 'param_groups' only: the optim
            # wrapper's base learning rate (what the log shows as base_lr) is added back.
            state_dict = super().optim_state_dict()
            settings = getattr(self.optim_wrapper, "base_param_settings", None)
            if isinstance(state_dict, dict) and settings is not None:
                state_dict["base_param_settings"] = dict(settings)
            return state_dict

        def load_optim_state_dict(self, state_dict: dict) -> None:
            optimizer = self.optim_wrapper.optimizer
            settings = state_dict.pop("base_param_settings", None)
            state_dict = FullyShardedDataParallel.optim_state_dict_to_load(self.model, optimizer, state_dict)
            if settings is not None:
                state_dict["base_param_settings"] = settings
            self.optim_wrapper.load_state_dict(state_dict)

    return InternImageFSDPStrategy


InternImageFSDPStrategy = _register_fsdp_strategy()


def _register_wrap_policy():
    from mmengine.registry import FUNCTIONS

    FUNCTIONS.register_module(name="internimage_block_wrap_policy", module=internimage_block_wrap_policy,
                              force=True)


_register_wrap_policy()
