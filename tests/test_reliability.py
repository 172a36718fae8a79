"""Atomic checkpoint writes, picking the checkpoint to resume from, and the training hooks
(unit level; tests/test_detection.py kills real training runs)."""
import io
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import internimage  # noqa: F401
from internimage import hooks
from internimage.fileio import AtomicLocalBackend, atomic_write
from internimage.runner_utils import find_resume_checkpoint, is_complete_checkpoint


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
    monkeypatch.setattr(internimage.fileio, "atomic_write", lambda data, path, **kw: calls.append(path))
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

    error = info


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
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    # loading for fine-tuning/testing leaves the generators alone
    state = torch.get_rng_state()
    hook.after_load_checkpoint(_runner(_resume=False), checkpoint)
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
