"""Training hooks for reliable runs (registered in mmengine's HOOKS by ``import internimage.engine``,
so mmdet and mmseg configs find them).

* ``NonFiniteLossHook``: stops training at the first iteration whose loss is NaN or
  infinite, naming the iteration and every loss term, on all ranks at once.
* ``RandomStateHook``: stores the Python, NumPy and torch random states of every rank in
  each checkpoint and restores them on resume, so a resumed run draws the same
  augmentations and samples as an uninterrupted one; validation leaves them untouched.
* ``ParamSyncCheckHook``: checks at the end of training (and every ``interval`` epochs)
  that the model parameters are bit-identical on all ranks, and fails otherwise.
* ``ShardedEMAHook``: ``EMAHook`` for a model sharded by FSDP (``use_orig_params=True``):
  each rank averages its own shards; checkpoints hold the full EMA weights.
"""
import hashlib
import itertools
import math
import random
from typing import Dict, Optional

import numpy as np
import torch
from mmengine import dist
from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS, MODELS


def _as_float(value) -> Optional[float]:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean()) if value.numel() else None
    if isinstance(value, (int, float, np.number)):
        return float(value)
    return None


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Raise ``FloatingPointError`` when a loss term is NaN or infinite.

    Runs before the checkpoint and logger hooks, so no checkpoint with non-finite weights
    is written (with ``interval`` > 1, iterations in between are not checked). In
    distributed runs the verdict is all-reduced: every rank stops at the same iteration
    instead of the others waiting for it in the next all-reduce.

    Args:
        interval: check every ``interval`` iterations.
        patience: non-finite iterations in a row tolerated before stopping. Default: 0, or
            20 with mixed precision (``AmpOptimWrapper``), whose dynamic loss scaling skips
            the steps of iterations that overflowed and so recovers from a few of them.
    """

    priority = "ABOVE_NORMAL"

    def __init__(self, interval: int = 1, patience: Optional[int] = None):
        self.interval = interval
        self.patience = patience
        self._bad_in_a_row = 0

    def _patience(self, runner) -> int:
        if self.patience is not None:
            return self.patience
        from mmengine.optim import AmpOptimWrapper

        return 20 if isinstance(getattr(runner, "optim_wrapper", None), AmpOptimWrapper) else 0

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self.every_n_train_iters(runner, self.interval):
            return
        values = {name: _as_float(value) for name, value in (outputs or {}).items()}
        values = {name: value for name, value in values.items() if value is not None}
        bad = [name for name, value in values.items() if not math.isfinite(value)]
        flag = torch.tensor([1.0 if bad else 0.0])
        if dist.get_world_size() > 1:  # every rank takes part, with or without outputs
            dist.all_reduce(flag)
        if flag.item() == 0:
            self._bad_in_a_row = 0
            return
        self._bad_in_a_row += 1
        iters = len(runner.train_dataloader) if hasattr(runner.train_dataloader, "__len__") else "?"
        where = f"iteration {runner.iter + 1} (epoch {runner.epoch + 1}, batch {batch_idx + 1}/{iters})"
        if bad:
            terms = ", ".join(f"{name}={value:.6g}" for name, value in values.items())
            message = f"non-finite loss at {where}: {', '.join(bad)} not finite; all terms: {terms}"
        else:
            message = f"non-finite loss on another rank at {where}"
        if self._bad_in_a_row <= self._patience(runner):
            runner.logger.warning(f"{message} ({self._bad_in_a_row} in a row; tolerated up to "
                                  f"{self._patience(runner)} with mixed precision)")
            return
        message += (". Training stopped before saving; lower the learning rate or add gradient clipping "
                    "(optim_wrapper.clip_grad), then continue from the last checkpoint with --resume")
        runner.logger.error(message)
        raise FloatingPointError(message)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Save the random-number generator states with each checkpoint; restore them on resume.

    mmengine re-seeds a resumed run with the seed it started from, so the data order is
    right (the sampler is seeded per epoch) but augmentations, RoI sampling and drop-path
    draw different numbers than the uninterrupted run would. With this hook the states at
    the moment of the save come back, every rank's own: before an epoch or iteration after
    which the ``CheckpointHook`` saves, all ranks gather their states (one small all-gather)
    and the checkpoint keeps the list (``rng_state_per_rank``; ``rng_state`` is rank 0's, for
    a resume on another number of processes, which then gives every rank rank 0's states,
    unless ranks draw different numbers, ``diff_rank_seed``, when none are restored).

    Validation draws from the same generators (the data loader takes a seed from torch's at
    each pass); its states are put back after each validation epoch, so that a run
    validated after epoch N continues exactly as one resumed from epoch N's checkpoint.
    """

    priority = "NORMAL"

    def __init__(self):
        self._pending = None
        self._gathered = None  # (iteration, [state of rank 0, rank 1, ...])
        self._val_state = None

    @staticmethod
    def _state() -> dict:
        state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
            state["cuda_current"] = torch.cuda.get_rng_state()
        return state

    @staticmethod
    def _set_state(state: dict, all_cuda: bool) -> None:
        random.setstate(_to_tuple(state["python"]))
        np.random.set_state(_to_tuple(state["numpy"]))
        torch.set_rng_state(state["torch"].cpu())
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return
        if all_cuda and "cuda" in state and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        elif not all_cuda and "cuda_current" in state:
            torch.cuda.set_rng_state(state["cuda_current"].cpu())

    @staticmethod
    def _saves_after(runner, by_epoch: bool) -> bool:
        """Whether a ``CheckpointHook`` saves at the end of this epoch / iteration."""
        from mmengine.hooks import CheckpointHook

        for hook in runner.hooks:
            if not isinstance(hook, CheckpointHook) or hook.by_epoch != by_epoch:
                continue
            if by_epoch and (hook.every_n_epochs(runner, hook.interval, hook.save_begin)
                             or (hook.save_last and hook.is_last_train_epoch(runner))):
                return True
            if not by_epoch and (hook.every_n_train_iters(runner, hook.interval, hook.save_begin)
                                 or (hook.save_last and hook.is_last_train_iter(runner))):
                return True
        return False

    def _gather(self, runner) -> None:
        # On every rank (a checkpoint is written by rank 0 only, in the Runner's
        # master-only save_checkpoint: no collective can be started from there).
        self._gathered = (runner.iter, dist.all_gather_object(self._state()))

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if dist.get_world_size() > 1 and self._saves_after(runner, by_epoch=False):
            self._gather(runner)

    def after_train_epoch(self, runner) -> None:
        if dist.get_world_size() > 1:  # also for a best checkpoint saved after validation
            self._gather(runner)

    def before_val_epoch(self, runner) -> None:
        self._val_state = self._state()

    def after_val_epoch(self, runner, metrics=None) -> None:
        state, self._val_state = self._val_state, None
        if state is not None:
            self._set_state(state, all_cuda=False)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint["rng_state"] = self._state()
        if self._gathered is not None and self._gathered[0] == runner.iter:
            checkpoint["rng_state"] = self._gathered[1][0]
            checkpoint["rng_state_per_rank"] = self._gathered[1]

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # Only when resuming (a checkpoint loaded for fine-tuning or testing keeps the seed).
        # Applied in before_train: Runner.resume re-seeds after loading when the run's seed
        # differs from the checkpoint's (always, when the config leaves the seed random).
        self._pending = None
        if getattr(runner, "_resume", False) and checkpoint.get("rng_state") is not None:
            self._pending = (checkpoint["rng_state"], checkpoint.get("rng_state_per_rank"))

    def before_train(self, runner) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        state, per_rank = pending
        world = dist.get_world_size()
        if per_rank is not None and len(per_rank) == world:
            self._set_state(per_rank[dist.get_rank()], all_cuda=False)
            runner.logger.info(f"restored the random states saved with the checkpoint (each of the {world} "
                               "ranks its own)")
            return
        if world > 1 and (getattr(runner, "_randomness_cfg", None) or {}).get("diff_rank_seed"):
            held = "rank 0's" if per_rank is None else f"those of {len(per_rank)} ranks, not {world}"
            runner.logger.info(f"random states not restored: ranks draw different numbers (diff_rank_seed) and "
                               f"the checkpoint holds {held}")
            return
        self._set_state(state, all_cuda=world == 1)
        runner.logger.info("restored the random states saved with the checkpoint")


def _to_tuple(value):
    """Checkpoints can turn tuples into lists (e.g. through a JSON round trip)."""
    if isinstance(value, list):
        return tuple(_to_tuple(v) if isinstance(v, list) else v for v in value)
    return value


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter (names, dtypes, shapes and bytes), in order.

    Buffers are left out: with ``broadcast_buffers=False`` (mmengine's default wrapper)
    BatchNorm running statistics legitimately differ across ranks."""
    digest = hashlib.sha256()
    module = getattr(model, "module", model)
    for name, tensor in module.named_parameters():
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@HOOKS.register_module()
class ParamSyncCheckHook(Hook):
    """Fail if the parameters differ across ranks (a desynchronised data-parallel run).

    Checked after training and, with ``interval`` > 0, every ``interval`` epochs. Hashing
    reads every parameter once (about a second per GB). Single-process runs are skipped.
    """

    priority = "LOW"

    def __init__(self, interval: int = 0):
        self.interval = interval

    def _check(self, runner, when: str) -> None:
        world = dist.get_world_size()
        if world < 2:
            return
        digests = dist.all_gather_object(parameter_digest(runner.model))
        if len(set(digests)) != 1:
            listing = ", ".join(f"rank {rank}: {d[:12]}" for rank, d in enumerate(digests))
            raise RuntimeError(f"parameters differ across ranks {when}: {listing}")
        runner.logger.info(f"parameters identical on all {world} ranks {when} (sha256 {digests[0][:16]})")

    def after_train_epoch(self, runner) -> None:
        if self.interval > 0 and self.every_n_epochs(runner, self.interval):
            self._check(runner, f"after epoch {runner.epoch}")

    def after_train(self, runner) -> None:
        self._check(runner, f"after training (iteration {runner.iter})")


class _Shards(torch.nn.Module):
    """The parameters (and buffers) of a module, registered under positional names: a view
    of an FSDP model as one rank holds it (with ``use_orig_params`` and outside forward and
    backward, each parameter is this rank's part of it, possibly empty)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.params = torch.nn.ParameterList(list(module.parameters()))
        for i, buffer in enumerate(module.buffers()):
            self.register_buffer(f"buffer{i}", buffer)


def _drop_gathered_parameters(model: torch.nn.Module) -> None:
    """Free the full parameters FSDP still holds from the last forward, so that the next
    forward gathers the shards again. After a forward without backward (validation) the
    root FSDP module keeps its gathered ("unsharded") parameters and the next forward
    reuses them instead of gathering: shards changed in place in between (the EMA swaps)
    went unseen, and training continued from the EMA weights. Uses PyTorch internals
    (``torch.distributed.fsdp._runtime_utils._reshard``, as FSDP's own post-backward)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._runtime_utils import _reshard

    for module in FullyShardedDataParallel.fsdp_modules(model):
        handle = getattr(module, "_handle", None)
        if handle is not None and handle.uses_sharded_strategy:
            _reshard(module, handle, True)


@HOOKS.register_module()
class ShardedEMAHook(EMAHook):
    """mmengine's / mmpretrain's ``EMAHook`` for a model wrapped by FSDP with
    ``use_orig_params=True`` (what ``tools/train.py --strategy fsdp`` uses it for).

    The average is kept for this rank's shards of the parameters (and the whole buffers,
    which FSDP does not shard): per element the same arithmetic as the unsharded hook, in
    1/N of its memory. Swaps for validation copy in place into the shards, which the next
    forward gathers. A checkpoint gets what ``EMAHook`` writes: ``state_dict`` the full EMA
    weights (for testing and ``tools/publish_model.py``) and ``ema_state_dict`` the full
    raw weights under ``module.`` plus ``steps``; gathering them is a collective, which
    works because ``FlexibleRunner`` saves on every rank. On resume the raw weights go
    into the model and the EMA weights into the shards. Loading a checkpoint without
    resuming starts model and average from its ``state_dict`` (the EMA weights).

    Arguments as ``EMAHook``'s, plus mmpretrain's ``evaluate_on_ema`` / ``evaluate_on_origin``.
    """

    def __init__(self, ema_type: str = "ExponentialMovingAverage", strict_load: bool = False,
                 begin_iter: int = 0, begin_epoch: int = 0, evaluate_on_ema: bool = True,
                 evaluate_on_origin: bool = False, **kwargs):
        super().__init__(ema_type=ema_type, strict_load=strict_load, begin_iter=begin_iter,
                         begin_epoch=begin_epoch, **kwargs)
        self.evaluate_on_ema = evaluate_on_ema
        self.evaluate_on_origin = evaluate_on_origin or not evaluate_on_ema
        self._model = None
        self._loaded = None  # (EMA state dict, steps) read by after_load_checkpoint

    # The source of the average: the FSDP model's parameters as this rank holds them.
    @property
    def src_model(self):
        return _Shards(self._model) if self._model is not None else None

    @src_model.setter
    def src_model(self, value):
        pass  # EMAHook.before_run sets it to the unwrapped module: ours are the shards

    def before_run(self, runner) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = runner.model
        if not isinstance(model, FullyShardedDataParallel) or not getattr(model, "_use_orig_params", False):
            raise RuntimeError("ShardedEMAHook needs a model wrapped by FullyShardedDataParallel with "
                               "use_orig_params=True (tools/train.py --strategy fsdp); use EMAHook otherwise")
        self._model = model
        self.ema_model = MODELS.build(self.ema_cfg, default_args=dict(model=self.src_model))
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            self._load_average(*loaded)

    def _load_average(self, state_dict: dict, steps) -> None:
        """Put a full EMA state dict into the average: FSDP loads it into the model, which
        slices this rank's shards; those are copied out and the model's own put back."""
        _drop_gathered_parameters(self._model)
        current = [t.detach().clone() for t in self.src_model.state_dict().values()]
        self._model.load_state_dict(state_dict, strict=self.strict_load)
        with torch.no_grad():
            for average, source, own in zip(self.ema_model.module.state_dict().values(),
                                            self.src_model.state_dict().values(), current):
                average.copy_(source)
                source.copy_(own)
        _drop_gathered_parameters(self._model)
        if steps is not None:
            self.ema_model.steps.fill_(int(steps))

    def _swap_ema_parameters(self) -> None:
        _drop_gathered_parameters(self._model)
        average = self.ema_model.module
        source = self.src_model
        if self.ema_model.update_buffers:
            pairs = zip(itertools.chain(average.parameters(), average.buffers()),
                        itertools.chain(source.parameters(), source.buffers()))
        else:
            pairs = zip(average.parameters(), source.parameters())
        with torch.no_grad():
            for p_avg, p_src in pairs:
                tmp = p_avg.data.clone()
                p_avg.data.copy_(p_src.data)
                p_src.data.copy_(tmp)
        _drop_gathered_parameters(self._model)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # On every rank: gathering the full EMA weights is a collective.
        self._swap_ema_parameters()
        try:
            averaged = self._model.state_dict()  # full on rank 0, empty elsewhere (rank0_only)
            # The state dict's buffers are the model's own tensors where offloading to the
            # CPU copies nothing (a CPU machine): copied before the swap back.
            live = {buffer.data_ptr() for buffer in self._model.buffers()}
            averaged = {k: v.clone() if v.data_ptr() in live else v for k, v in averaged.items()}
        finally:
            self._swap_ema_parameters()
        if checkpoint.get("state_dict"):
            ema_state = {f"module.{k}": v for k, v in averaged.items()}
            ema_state["steps"] = self.ema_model.steps.detach().clone().cpu()
            checkpoint["ema_state_dict"] = ema_state
            self._swap_ema_state_dict(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # Called before before_run (FlexibleRunner loads before it): kept for it.
        self._loaded = None
        if "ema_state_dict" not in checkpoint:
            if getattr(runner, "_resume", False):
                print_log("There is no `ema_state_dict` in checkpoint. The EMA starts from the checkpoint's "
                          "`state_dict`", "current", 30)
            return
        if getattr(runner, "_resume", False):
            # The checkpoint's state_dict holds the EMA weights: the raw ones go to the model.
            self._swap_ema_state_dict(checkpoint)
            ema_state = checkpoint["ema_state_dict"]
            self._loaded = ({k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")},
                            ema_state.get("steps"))

    def before_val_epoch(self, runner) -> None:
        if self.evaluate_on_ema:
            self._swap_ema_parameters()

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        if self.evaluate_on_ema:
            self._swap_ema_parameters()
        if self.evaluate_on_ema and self.evaluate_on_origin:  # as mmpretrain's EMAHook
            val_loop = runner.val_loop
            runner.model.eval()
            for idx, data_batch in enumerate(val_loop.dataloader):
                val_loop.run_iter(idx, data_batch)
            for k, v in val_loop.evaluator.evaluate(len(val_loop.dataloader.dataset)).items():
                runner.message_hub.update_scalar(f"val/{k}_origin", v)

    def before_test_epoch(self, runner) -> None:
        if self.evaluate_on_ema:
            self._swap_ema_parameters()

    def after_test_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        if self.evaluate_on_ema:
            self._swap_ema_parameters()
