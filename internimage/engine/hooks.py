"""Training hooks for reliable runs (registered in mmengine's HOOKS by ``import internimage.engine``,
so mmdet and mmseg configs find them).

* ``NonFiniteLossHook``: stops training at the first iteration whose loss is NaN or
  infinite, naming the iteration and every loss term, on all ranks at once.
* ``RandomStateHook``: stores the Python, NumPy and torch random states in each checkpoint
  and restores them on resume, so a resumed run draws the same augmentations and samples
  as an uninterrupted one (exactly so for one process; with several, every rank gets
  rank 0's states, as at the start when all ranks share the seed).
* ``ParamSyncCheckHook``: checks at the end of training (and every ``interval`` epochs)
  that the model parameters are bit-identical on all ranks, and fails otherwise.
"""
import hashlib
import math
import random
from typing import Optional

import numpy as np
import torch
from mmengine import dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


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
    the moment of the save come back. Checkpoints are saved by rank 0, so the states are
    rank 0's; other ranks get the same states (with mmengine's default, every rank starts
    from the same seed anyway).
    """

    priority = "NORMAL"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["rng_state"] = state

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # Only when resuming (a checkpoint loaded for fine-tuning or testing keeps the seed).
        # Applied in before_train: Runner.resume re-seeds after loading when the run's seed
        # differs from the checkpoint's (always, when the config leaves the seed random).
        self._pending = checkpoint.get("rng_state") if getattr(runner, "_resume", False) else None

    def before_train(self, runner) -> None:
        state, self._pending = getattr(self, "_pending", None), None
        if state is None:
            return
        world = dist.get_world_size()
        if world > 1 and (getattr(runner, "_randomness_cfg", None) or {}).get("diff_rank_seed"):
            runner.logger.info("random states not restored: ranks draw different numbers (diff_rank_seed) and "
                               "checkpoints hold rank 0's")
            return
        random.setstate(_to_tuple(state["python"]))
        np.random.set_state(_to_tuple(state["numpy"]))
        torch.set_rng_state(state["torch"].cpu())
        if world == 1 and "cuda" in state and torch.cuda.is_available() \
                and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
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
