"""Atomic checkpoint writes, picking the checkpoint to resume from, and the training hooks
(unit level; tests/test_detection.py kills real training runs)."""
import io
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmengine.model import BaseModel

import internimage  # noqa: F401
from internimage.engine import hooks
from internimage.engine.fileio import AtomicLocalBackend, atomic_write
from internimage.engine.runner_utils import find_resume_checkpoint, is_complete_checkpoint


def test_atomic_write_replaces_whole_file_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "epoch_1.pth"
    backend = AtomicLocalBackend()
    backend.put(b"first", target)
    assert target.read_bytes() == b"first"
    backend.put_text("second", target)
    assert target.read_text() == "second"

    def interrupted(src, dst):
        raise KeyboardInterrupt  # e.g. Ctrl-C between writing and renaming

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(b"third", target)
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["epoch_1.pth"]  # no temporary file left


def test_mmengine_checkpoint_saving_goes_through_the_atomic_backend(tmp_path, monkeypatch):
    from mmengine.runner.checkpoint import save_checkpoint

    calls = []
    monkeypatch.setattr(internimage.engine.fileio, "atomic_write", lambda data, path, **kw: calls.append(path))
    save_checkpoint({"state_dict": {}}, str(tmp_path / "epoch_1.pth"), backend_args=dict(backend="local_atomic"))
    assert calls == [str(tmp_path / "epoch_1.pth")]


def _save(path, value=1.0):
    torch.save({"state_dict": {"w": torch.tensor([value])}}, path)
    return str(path)


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    first = _save(tmp_path / "epoch_1.pth")
    second = _save(tmp_path / "epoch_2.pth")
    (tmp_path / "last_checkpoint").write_text(second)
    (tmp_path / "epoch_3.pth.tmp-4242").write_bytes(b"partial")
    assert find_resume_checkpoint(str(tmp_path)) == second
    assert not (tmp_path / "epoch_3.pth.tmp-4242").exists()

    # last_checkpoint naming a truncated file (a save without the atomic backend): fall back.
    data = open(second, "rb").read()
    open(second, "wb").write(data[: len(data) // 2])
    assert not is_complete_checkpoint(second) and is_complete_checkpoint(first)
    assert find_resume_checkpoint(str(tmp_path)) == first

    # last_checkpoint empty (killed while writing it): the newest complete checkpoint.
    (tmp_path / "last_checkpoint").write_text("")
    assert find_resume_checkpoint(str(tmp_path)) == first
    os.remove(first)
    assert find_resume_checkpoint(str(tmp_path)) is None


class _Logger:
    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(msg)

    error = warning = info


def _runner(**kw):
    fields = dict(logger=_Logger(), iter=6, epoch=1, train_dataloader=[0] * 4, _resume=True)
    return SimpleNamespace(**{**fields, **kw})


def test_non_finite_loss_hook_names_iteration_and_terms():
    hook = hooks.NonFiniteLossHook()
    runner = _runner()
    hook.after_train_iter(runner, 2, outputs={"loss": torch.tensor(1.5), "loss_cls": torch.tensor(0.5)})
    with pytest.raises(FloatingPointError) as info:
        hook.after_train_iter(runner, 2, outputs={"loss": torch.tensor(float("nan")), "loss_cls": torch.tensor(0.5),
                                                  "loss_bbox": torch.tensor(float("inf")), "acc": torch.tensor(90.0)})
    message = str(info.value)
    assert "iteration 7 (epoch 2, batch 3/4)" in message
    assert "loss, loss_bbox not finite" in message and "loss_cls=0.5" in message and "acc=90" in message


def test_random_state_hook_restores_all_generators():
    hook = hooks.RandomStateHook()
    checkpoint = {}
    hook.before_save_checkpoint(_runner(), checkpoint)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.random(), np.random.rand(), torch.rand(5)  # move on
    # through a file, as on resume (weights_only=True: the NumPy state must be allow-listed)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    hook.after_load_checkpoint(_runner(), torch.load(buffer))
    hook.before_train(_runner())  # applied when training starts (after mmengine's re-seeding)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    # loading for fine-tuning/testing leaves the generators alone
    state = torch.get_rng_state()
    hook.after_load_checkpoint(_runner(_resume=False), checkpoint)
    hook.before_train(_runner(_resume=False))
    assert torch.equal(torch.get_rng_state(), state)


def test_param_sync_check_detects_a_rank_that_diverged(monkeypatch):
    model = torch.nn.Linear(3, 2)
    digest = hooks.parameter_digest(model)
    assert digest == hooks.parameter_digest(model)
    runner = _runner(model=model)
    monkeypatch.setattr(hooks.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(hooks.dist, "all_gather_object", lambda obj: [obj, obj])
    hooks.ParamSyncCheckHook().after_train(runner)
    assert "identical on all 2 ranks" in runner.logger.lines[-1]
    with torch.no_grad():
        model.bias[0] += 1e-7
    other = hooks.parameter_digest(model)
    assert other != digest
    monkeypatch.setattr(hooks.dist, "all_gather_object", lambda obj: [digest, other])
    with pytest.raises(RuntimeError, match="parameters differ across ranks"):
        hooks.ParamSyncCheckHook().after_train(runner)


class _TinyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 1)

    def forward(self, x, mode="tensor"):
        x = torch.stack(x) if isinstance(x, list) else x
        return dict(loss=self.fc(x).pow(2).mean()) if mode == "loss" else self.fc(x)


class _Points(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return dict(x=torch.full((2,), float(index)))


@pytest.mark.parametrize("seed", [0, None])
def test_random_states_survive_mmengine_resume(tmp_path, seed):
    """With a random seed (seed=None, the real configs' default) mmengine re-seeds after
    loading the checkpoint; the states must still be the saved ones when training goes on."""
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    at_start = {}

    class Probe(Hook):
        def before_train_epoch(self, runner):
            at_start.setdefault("torch", torch.get_rng_state().clone())

    def runner(work_dir, epochs, resume_from=None):
        return Runner(model=_TinyModel(), work_dir=str(work_dir), randomness=dict(seed=seed),
                      train_dataloader=dict(dataset=_Points(), batch_size=2, collate_fn=dict(type="default_collate"),
                                            sampler=dict(type="DefaultSampler", shuffle=True)),
                      optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01)),
                      train_cfg=dict(by_epoch=True, max_epochs=epochs),
                      default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1)),
                      custom_hooks=[dict(type="RandomStateHook"), Probe()],
                      resume=resume_from is not None, load_from=resume_from)

    runner(tmp_path / "first", 1).train()
    saved = torch.load(tmp_path / "first" / "epoch_1.pth")["rng_state"]["torch"]
    at_start.clear()
    runner(tmp_path / "resumed", 2, resume_from=str(tmp_path / "first" / "epoch_1.pth")).train()
    assert torch.equal(at_start["torch"], saved)


def test_non_finite_loss_hook_patience():
    hook = hooks.NonFiniteLossHook(patience=2)
    runner = _runner()
    nan = {"loss": torch.tensor(float("nan"))}
    hook.after_train_iter(runner, 0, outputs=nan)
    hook.after_train_iter(runner, 1, outputs={"loss": torch.tensor(1.0)})  # resets the count
    hook.after_train_iter(runner, 2, outputs=nan)
    hook.after_train_iter(runner, 3, outputs=nan)
    with pytest.raises(FloatingPointError):
        hook.after_train_iter(runner, 4, outputs=nan)
    assert sum("in a row" in line for line in runner.logger.lines) == 3


def test_parameter_digest_covers_parameters_not_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # 0-dim num_batches_tracked
    digest = hooks.parameter_digest(model)
    model[1].running_mean += 1  # BN statistics may differ across ranks (broadcast_buffers=False)
    assert hooks.parameter_digest(model) == digest
    with torch.no_grad():
        model[1].weight[0] = 2.0
    assert hooks.parameter_digest(model) != digest


def test_resume_looks_in_the_folder_last_checkpoint_names(tmp_path):
    out_dir = tmp_path / "out" / "run"
    out_dir.mkdir(parents=True)
    first = _save(out_dir / "epoch_1.pth")
    second = out_dir / "epoch_2.pth"
    second.write_bytes(b"truncated")
    (out_dir / "epoch_3.pth.tmp-99").write_bytes(b"partial")
    (tmp_path / "last_checkpoint").write_text(str(second))
    assert find_resume_checkpoint(str(tmp_path)) == first
    # The pointer is only a file in the work dir: it may lead the search, not the deletions.
    assert (out_dir / "epoch_3.pth.tmp-99").exists()
    # The folder the config's checkpoint hook writes to is cleaned.
    assert find_resume_checkpoint(str(tmp_path), checkpoint_dir=str(out_dir)) == first
    assert not (out_dir / "epoch_3.pth.tmp-99").exists()


def test_checkpoint_folder_follows_the_hook_out_dir(tmp_path):
    from mmengine.config import Config

    from internimage.engine.runner_utils import checkpoint_folder

    cfg = Config(dict(work_dir=str(tmp_path / "work_dirs" / "exp"), default_hooks=dict(checkpoint=dict(
        type="CheckpointHook", out_dir=str(tmp_path / "ckpts")))))
    assert checkpoint_folder(cfg) == str(tmp_path / "ckpts" / "exp")
    cfg.default_hooks.checkpoint.out_dir = None
    assert checkpoint_folder(cfg) is None
