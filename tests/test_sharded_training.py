"""Sharded training (issue #18): ``tools/train.py --strategy fsdp`` with two gloo processes
on CPU (train, checkpoint, --resume, publish), the layer-decay learning rates under FSDP,
the DeepSpeed strategy configs, and ``tools/memory_plan.py``."""
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

import internimage  # noqa: F401
import internimage.engine  # noqa: F401
from internimage.engine.runner_utils import apply_strategy

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "internimage-tiny_imagenet-shapes.py"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_classification import make_imagenet_shapes  # noqa: E402


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_imagenet_shapes(tmp_path_factory.mktemp("shapes_imagenet"))


def env_for(shapes_root=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if shapes_root:
        env["INTERNIMAGE_SHAPES_IMAGENET"] = shapes_root
    return env


def torchrun(args, env, port, timeout=240, expect_failure=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = result.stdout + result.stderr
    assert (result.returncode != 0) == expect_failure, log[-5000:]
    return log


def tiny_config_without_ema(tmp_path):
    """The tiny classifier without EMAHook (refused under FSDP) and without save_best."""
    path = tmp_path / "tiny_fsdp.py"
    path.write_text(textwrap.dedent(f"""\
        _base_ = [{str(TINY)!r}]
        custom_hooks = [dict(type='ClassCountCheckHook')]
        train_cfg = dict(max_epochs=1, val_interval=1)
        default_hooks = dict(checkpoint=dict(save_best=None))
        """))
    return path


def test_fsdp_trains_resumes_and_publishes_on_two_cpu_processes(shapes, tmp_path):
    config, work = tiny_config_without_ema(tmp_path), tmp_path / "work"
    env = env_for(shapes)
    train = ["tools/train.py", str(config), "--launcher", "pytorch", "--strategy", "fsdp", "--work-dir", str(work)]
    log = torchrun(train, env, 29641)
    assert "FlexibleRunner with InternImageFSDPStrategy" in log
    assert "Epoch(train) [1][2/2]" in log and (work / "epoch_1.pth").is_file()
    first = torch.load(work / "epoch_1.pth", map_location="cpu", weights_only=False)
    assert first["meta"]["epoch"] == 1 and first["optimizer"]["state"]  # full optimizer state, one file
    # Each AdamW state its own (PyTorch's CPU "offload" made them all one buffer: exp_avg_sq).
    states = first["optimizer"]["state"].values()
    assert all(s["exp_avg"].data_ptr() != s["exp_avg_sq"].data_ptr() for s in states)
    assert not all(torch.equal(s["exp_avg"], s["exp_avg_sq"]) for s in states)
    assert first["optimizer"]["base_param_settings"]["lr"] == pytest.approx(1e-3)

    log = torchrun(train + ["--resume", "--cfg-options", "train_cfg.max_epochs=2"], env, 29642)
    assert "resumed epoch: 1, iter: 2" in log and "Epoch(train) [2][2/2]" in log
    second = torch.load(work / "epoch_2.pth", map_location="cpu", weights_only=False)
    assert second["meta"]["epoch"] == 2
    moved = [k for k in first["state_dict"] if not torch.equal(first["state_dict"][k], second["state_dict"][k])]
    assert moved, "the resumed epoch did not change the weights"

    out = subprocess.run([sys.executable, "tools/publish_model.py", str(work / "epoch_2.pth"),
                          str(tmp_path / "tiny.pth")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    (published,) = tmp_path.glob("tiny-*.pth")
    plain = torch.load(published, map_location="cpu", weights_only=True)
    assert set(plain) == {"meta", "state_dict"}

    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    init_default_scope("mmpretrain")
    model = MODELS.build(Config.fromfile(str(TINY)).model)
    model.load_state_dict(plain["state_dict"], strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, second["state_dict"][key]), key


LR_SCRIPT = """
import copy, json, sys
import torch, torch.distributed as dist
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
import internimage, internimage.engine
from internimage.engine.runner_utils import InternImageFSDPStrategy
from mmpretrain.registry import MODELS

dist.init_process_group("gloo")
init_default_scope("mmpretrain")
cfg = Config.fromfile(sys.argv[1])
cfg.model.pop("train_cfg", None)  # batch augments (Mixup/CutMix): no parameters
optim = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05),
             constructor="InternImageLayerDecayOptimizerConstructor",
             paramwise_cfg=dict(num_layers=5, layer_decay_rate=0.7, depths=[1, 1, 2, 1], dcn_lr_mul=0.1))

def lrs(wrapper):
    return {name: (group["lr"], group["weight_decay"])
            for group in wrapper.optimizer.param_groups for name in group["param_names"]}

plain = lrs(build_optim_wrapper(MODELS.build(cfg.model), copy.deepcopy(optim)))
strategy = InternImageFSDPStrategy(model_wrapper=dict(type="MMFullyShardedDataParallel", use_orig_params=True,
                                                      device_id=torch.device("cpu")), state_dict_cfg="full")
wrapped = strategy._wrap_model(MODELS.build(cfg.model))
assert type(wrapped).__name__ == "MMFullyShardedDataParallel"
sharded = strategy.build_optim_wrapper(copy.deepcopy(optim), wrapped)
wrapped_names = [n for n, _ in wrapped.named_parameters()]
if dist.get_rank() == 0:
    print("RESULT", json.dumps(dict(plain=plain, sharded=lrs(sharded), wrapped_names=wrapped_names)))
dist.barrier()
dist.destroy_process_group()
"""


def test_layer_decay_learning_rates_under_fsdp_equal_those_without(tmp_path):
    script = tmp_path / "lrs.py"
    script.write_text(LR_SCRIPT)
    log = torchrun([str(script), str(TINY)], env_for(), 29643, timeout=180)
    result = json.loads(next(line for line in log.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert all(name.startswith("_fsdp_wrapped_module.") for name in result["wrapped_names"])
    plain, sharded = result["plain"], result["sharded"]
    assert sharded == plain
    assert len({lr for lr, _ in plain.values()}) > 3  # the decay is in effect (not one lr for all)


def test_without_the_flag_the_config_is_unchanged():
    cfg = Config.fromfile(str(TINY))
    before = cfg.to_dict()
    apply_strategy(cfg, None)
    assert cfg.to_dict() == before and "runner_type" not in cfg


def test_fsdp_strategy_config_and_ema_becomes_sharded():
    cfg = Config.fromfile(str(TINY))
    optim_before = cfg.optim_wrapper.to_dict()
    apply_strategy(cfg, "fsdp")
    assert cfg.runner_type == "FlexibleRunner"
    assert cfg.strategy.type == "InternImageFSDPStrategy" and cfg.strategy.state_dict_cfg == "full"
    wrapper = cfg.strategy.model_wrapper
    assert wrapper.use_orig_params is True and wrapper.sync_module_states is True
    assert wrapper.auto_wrap_policy == dict(type="internimage_block_wrap_policy")
    assert cfg.optim_wrapper.to_dict() == optim_before
    ema = [h for h in cfg.custom_hooks if "EMA" in h["type"]]
    assert [h["type"] for h in ema] == ["ShardedEMAHook"] and ema[0]["momentum"] == 0.5


def test_deepspeed_refuses_ema(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    with pytest.raises(SystemExit, match="EMAHook is not supported with DeepSpeed"):
        apply_strategy(Config.fromfile(str(TINY)), "deepspeed-zero1")


H_G_CONFIGS = ["classification/internimage-h_in22k-pre_in1k-640.py",
               "classification/internimage-g_in22k-pre_in1k-512.py",
               "upernet/upernet_internimage-h_896_160k_ade20k.py", "upernet/upernet_internimage-g_896_160k_ade20k.py",
               "dino/dino-4scale_internimage-h_objects365-pre_coco.py",
               "dino/dino-4scale_internimage-g_objects365-pre_coco.py",
               "mask2former/mask2former_internimage-h_896_80k_cocostuff2ade20k_ss.py"]


@pytest.mark.parametrize("name", H_G_CONFIGS)
def test_h_and_g_configs_state_fsdp_and_train_py_uses_it(name):
    """The config's strategy is what --strategy fsdp gives; tools/train.py with a launcher
    trains it with FlexibleRunner; --strategy overrides it; one process drops it; the
    config has no runner_type, so tools/test.py (mmengine's Runner) ignores it."""
    from internimage.engine.runner_utils import fsdp_strategy

    cfg = Config.fromfile(str(REPO / "configs" / name))
    assert cfg.strategy.to_dict() == fsdp_strategy()
    assert "runner_type" not in cfg
    cfg.launcher = "pytorch"
    apply_strategy(cfg, None)
    assert cfg.runner_type == "FlexibleRunner" and cfg.strategy.type == "InternImageFSDPStrategy"
    assert "EMAHook" not in [h["type"] for h in cfg.get("custom_hooks", [])]

    single = Config.fromfile(str(REPO / "configs" / name))
    single.launcher = "none"
    apply_strategy(single, None)
    assert "strategy" not in single and "runner_type" not in single
    ddp = Config.fromfile(str(REPO / "configs" / name))
    ddp.launcher = "pytorch"
    apply_strategy(ddp, "ddp")
    assert "strategy" not in ddp and "runner_type" not in ddp


def test_a_config_stating_fsdp_trains_through_train_py_with_flexible_runner(shapes, tmp_path, monkeypatch):
    """tools/train.py without --strategy on a config with strategy=FSDP (one gloo process in
    this test process): FlexibleRunner with InternImageFSDPStrategy and ShardedEMAHook."""
    from internimage.engine.runner_utils import fsdp_strategy

    config = tmp_path / "stated.py"
    config.write_text(f"_base_ = [{str(TINY)!r}]\ndefault_hooks = dict(checkpoint=dict(save_best=None))\n"
                      f"strategy = {fsdp_strategy()!r}\n")
    monkeypatch.setenv("INTERNIMAGE_SHAPES_IMAGENET", shapes)
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29659").items():
        monkeypatch.setenv(key, value)
    built = {}
    from mmengine.runner import FlexibleRunner

    original = FlexibleRunner.train

    def train(runner):
        built.update(runner=type(runner).__name__, strategy=type(runner.strategy).__name__,
                     hooks=[type(h).__name__ for h in runner.hooks])
        return original(runner)

    monkeypatch.setattr(FlexibleRunner, "train", train)
    sys.path.insert(0, str(REPO / "tools"))
    import train as train_tool

    train_tool.main([str(config), "--launcher", "pytorch", "--work-dir", str(tmp_path / "work")])
    assert built["runner"] == "FlexibleRunner" and built["strategy"] == "InternImageFSDPStrategy"
    assert "ShardedEMAHook" in built["hooks"]
    checkpoint = torch.load(tmp_path / "work" / "epoch_1.pth", map_location="cpu", weights_only=False)
    assert checkpoint["ema_state_dict"]["steps"] == checkpoint["meta"]["iter"] == 3  # 12 images, batch 4


def test_deepspeed_flag_needs_deepspeed(monkeypatch):
    cfg = Config.fromfile(str(TINY))
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not installed
    with pytest.raises(SystemExit, match="pip install deepspeed"):
        apply_strategy(cfg, "deepspeed-zero1")


@pytest.mark.parametrize("name, stage", [("deepspeed-zero1", 1), ("deepspeed-zero3", 3)])
def test_deepspeed_strategy_configs(monkeypatch, name, stage):
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    cfg = Config.fromfile(str(REPO / "configs/upernet/upernet_internimage-h_896_160k_ade20k.py"))
    cfg.optim_wrapper.type = "AmpOptimWrapper"
    cfg.optim_wrapper.loss_scale = "dynamic"
    paramwise = cfg.optim_wrapper.paramwise_cfg.to_dict()
    apply_strategy(cfg, name)
    assert cfg.runner_type == "FlexibleRunner" and cfg.strategy.type == "InternImageDeepSpeedStrategy"
    assert cfg.strategy.zero_optimization.stage == stage
    assert cfg.strategy.bf16 == dict(enabled=True)
    assert cfg.optim_wrapper.type == "DeepSpeedOptimWrapper" and "loss_scale" not in cfg.optim_wrapper
    assert cfg.optim_wrapper.constructor == "InternImageLayerDecayOptimizerConstructor"
    assert cfg.optim_wrapper.paramwise_cfg.to_dict() == paramwise


# --- tools/memory_plan.py ------------------------------------------------------------------

sys.path.insert(0, str(REPO / "tools"))
import memory_plan  # noqa: E402

# Parameter counts of the real configs' models (UperNet-H: backbone 1.08B + heads; G: 3.08B).
H_UPERNET = REPO / "configs/upernet/upernet_internimage-h_896_160k_ade20k.py"
G_CLS = REPO / "configs/classification/internimage-g_in22k-pre_in1k-512.py"


@pytest.mark.parametrize("config, count", [(H_UPERNET, 1_120_338_396), (G_CLS, 3_076_373_352)])
def test_memory_plan_weights_and_optimizer_match_hand_computed_bytes(config, count):
    cfg = Config.fromfile(str(config))
    assert memory_plan.count_parameters(cfg) == (count, count)
    gpus = 16
    result = memory_plan.plan(count, count, activations=123, gpus=gpus, mixed=False)
    # float32 AdamW: 4 B weights, 4 B gradients, 2 x 4 B moments per parameter.
    assert result["ddp"] == dict(params=4 * count, grads=4 * count, optimizer=8 * count, activations=123,
                                 total=16 * count + 123)
    assert result["zero1"]["optimizer"] == -(-8 * count // gpus) and result["zero1"]["params"] == 4 * count
    assert result["full_shard"] == dict(params=-(-4 * count // gpus), grads=-(-4 * count // gpus),
                                        optimizer=-(-8 * count // gpus), activations=123,
                                        total=2 * -(-4 * count // gpus) + -(-8 * count // gpus) + 123)
    mixed = memory_plan.plan(count, count, activations=0, gpus=gpus, mixed=True)
    # Mixed precision: 2 B weights and gradients, 12 B optimizer (float32 master + 2 moments).
    assert mixed["ddp"]["params"] == 2 * count and mixed["ddp"]["optimizer"] == 12 * count
    assert mixed["full_shard"]["total"] == 2 * -(-2 * count // gpus) + -(-12 * count // gpus)


def test_memory_plan_activation_estimate_matches_a_measured_run(tmp_path, capsys):
    config = tmp_path / "narrow.py"
    config.write_text(f"_base_ = [{str(TINY)!r}]\nmodel = dict(backbone=dict(channels=32, groups=[2, 4, 8, 16]))\n")
    memory_plan.main([str(config), "--gpus", "2", "--json", "--shape", "64", "64", "--batch", "1",
                      "--measure-width", "0.5", "--measure-size", "32"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"ddp", "zero1", "full_shard"}
    for row in result.values():
        assert all(isinstance(v, int) for v in row.values()) and row["total"] == sum(
            v for k, v in row.items() if k != "total")
    # Measured: the full-width backbone at the full input size, one image (the tiny config has no with_cp).
    from internimage import InternImage

    cfg = Config.fromfile(str(config))
    torch.manual_seed(0)
    measured = memory_plan.saved_activation_bytes(InternImage(**memory_plan.backbone_kwargs(cfg, 1.0)), (64, 64))
    estimate = result["ddp"]["activations"]
    assert 0.7 * measured < estimate < 1.4 * measured, (estimate, measured)


# --- exact resume, and a kill during a sharded save ----------------------------------------

# Imported by the config (custom_imports) in the trainer processes: with KILL_DURING_SAVE=NAME,
# rank 0 writes half of the first file whose name starts with NAME (the checkpoint itself or
# the temporary file of an atomic save), syncs it to disk and kills itself with SIGKILL.
KILL_DURING_SAVE = '''
import builtins, os, signal

TARGET = os.environ.get("KILL_DURING_SAVE")


def _name(file):
    return os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)


class _KillHalfway:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        os.fsync(self._f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _wrap(opener):
    def patched(file, mode="r", *args, **kwargs):
        f = opener(file, mode, *args, **kwargs)
        if "w" in mode and os.path.basename(_name(file)).startswith(TARGET):
            return _KillHalfway(f)
        return f
    return patched


if TARGET and os.environ.get("RANK") == "0":
    builtins.open, os.fdopen = _wrap(builtins.open), _wrap(os.fdopen)


from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class FailOnOneRankHook(Hook):
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if os.environ.get("RANK") == "1" and runner.iter == 2:
            raise RuntimeError("injected failure on rank 1")
'''


def three_epoch_config(tmp_path, hooks="[dict(type='ClassCountCheckHook')]"):
    """The tiny classifier for 3 epochs of 2 iterations (2 processes x 4 images), each loss
    logged as it is (no smoothing), validation every epoch, per-rank random streams (the
    base config's diff_rank_seed), and the module above imported; ``hooks=None`` keeps the
    tiny config's custom_hooks (with its EMAHook)."""
    (tmp_path / "kill_during_save.py").write_text(KILL_DURING_SAVE)
    path = tmp_path / "tiny_3ep.py"
    path.write_text(textwrap.dedent(f"""\
        _base_ = [{str(TINY)!r}]
        custom_imports = dict(imports=['internimage', 'internimage.engine', 'internimage.datasets',
                                       'kill_during_save'], allow_failed_imports=False)
        {"" if hooks is None else f"custom_hooks = {hooks}"}
        train_cfg = dict(max_epochs=3, val_interval=1)
        default_hooks = dict(checkpoint=dict(save_best=None, max_keep_ckpts=-1))
        log_processor = dict(window_size=1)
        """))
    return path


def logged_losses(work_dir) -> dict:
    """{iteration: (loss, grad_norm, lr, base_lr)} from the scalars.json files of every run
    in ``work_dir`` (a later run's record of an iteration replaces an earlier one's)."""
    losses = {}
    for scalars in sorted(Path(work_dir).glob("*/vis_data/scalars.json")):
        for line in scalars.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record and "lr" in record:
                losses[record["iter"]] = tuple(record.get(k) for k in ("loss", "grad_norm", "lr", "base_lr"))
    return losses


def assert_same_state(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}: {key}"
        elif isinstance(a[key], dict):
            assert_same_state(a[key], b[key], f"{what}.{key}")
        elif isinstance(a[key], list) and a[key] and isinstance(a[key][0], dict):
            for i, (x, y) in enumerate(zip(a[key], b[key])):
                assert_same_state(x, y, f"{what}.{key}[{i}]")
        else:
            assert a[key] == b[key], f"{what}: {key}"


def test_fsdp_killed_while_saving_resumes_exactly(shapes, tmp_path):
    """Run 3 epochs under FSDP on 2 processes; again, killing rank 0 half-way through writing
    epoch 2's checkpoint; then ``--resume``: no file under a checkpoint's name is partial,
    resume continues from epoch 1 (the temporary file removed), and every logged loss and
    the final weights and optimizer state equal those of the uninterrupted run."""
    config = three_epoch_config(tmp_path)
    env = dict(env_for(shapes), PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    train = ["tools/train.py", str(config), "--launcher", "pytorch", "--strategy", "fsdp", "--work-dir"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    torchrun(train + [str(whole)], env, 29644)
    expected = logged_losses(whole)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    torchrun(train + [str(broken)], dict(env, KILL_DURING_SAVE="epoch_2.pth"), 29645, expect_failure=True)
    assert (broken / "epoch_1.pth").is_file() and not (broken / "epoch_2.pth").exists()
    assert list(broken.glob("epoch_2.pth.tmp-*")), "no temporary file: the save was not interrupted"
    assert (broken / "last_checkpoint").read_text().strip().endswith("epoch_1.pth")

    log = torchrun(train + [str(broken), "--resume"], env, 29646)
    assert "left by a checkpoint save that was interrupted" in log
    assert "resumed epoch: 1, iter: 2" in log and "restored the random states" in log
    assert not list(broken.glob("*.tmp-*"))
    assert logged_losses(broken) == expected
    a = torch.load(whole / "epoch_3.pth", map_location="cpu", weights_only=False)
    b = torch.load(broken / "epoch_3.pth", map_location="cpu", weights_only=False)
    assert_same_state(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_state(a["optimizer"], b["optimizer"], "optimizer")


def test_ema_under_fsdp_is_saved_resumed_and_published_as_with_ddp(shapes, tmp_path):
    """The tiny config's EMAHook (momentum 0.5, buffers averaged, validation on the EMA
    weights) under ``--strategy fsdp`` becomes ShardedEMAHook: 2 epochs on 2 processes
    give the losses, validation accuracies and checkpoint (``state_dict`` = EMA weights,
    ``ema_state_dict`` = raw weights and ``steps``) of the same run under DDP with
    mmpretrain's EMAHook (up to float rounding); interrupted after epoch 1 and resumed,
    the same checkpoint bit for bit; published, the EMA weights."""
    config = three_epoch_config(tmp_path, hooks=None)
    env = dict(env_for(shapes), PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    train = ["tools/train.py", str(config), "--launcher", "pytorch", "--work-dir"]
    two = ["--cfg-options", "train_cfg.max_epochs=2"]
    fsdp, resumed, ddp = tmp_path / "fsdp", tmp_path / "resumed", tmp_path / "ddp"
    log = torchrun(train + [str(fsdp), "--strategy", "fsdp"] + two, env, 29647)
    assert "EMAHook replaced by ShardedEMAHook" in log
    torchrun(train + [str(ddp)] + two, env, 29648)
    torchrun(train + [str(resumed), "--strategy", "fsdp", "--cfg-options", "train_cfg.max_epochs=1"], env, 29649)
    torchrun(train + [str(resumed), "--strategy", "fsdp", "--resume"] + two, env, 29650)

    def load(work):
        return torch.load(work / "epoch_2.pth", map_location="cpu", weights_only=False)

    def val_accuracy(work):
        return [json.loads(line)["accuracy/top1"] for scalars in sorted(work.glob("*/vis_data/scalars.json"))
                for line in scalars.read_text().splitlines() if "accuracy/top1" in line]

    a, b, c = load(fsdp), load(resumed), load(ddp)
    # Resumed under FSDP: bit for bit.
    assert_same_state(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_state(a["ema_state_dict"], b["ema_state_dict"], "ema_state_dict")
    assert logged_losses(fsdp) == logged_losses(resumed)
    # FSDP against DDP: same keys, steps and validation; weights equal up to rounding (the
    # gradients are reduced in another order, which Adam amplifies where they are ~0).
    assert a["ema_state_dict"]["steps"] == c["ema_state_dict"]["steps"] == 4
    assert val_accuracy(fsdp) == val_accuracy(ddp) and len(val_accuracy(ddp)) == 2
    for (i, x), (j, y) in zip(sorted(logged_losses(fsdp).items()), sorted(logged_losses(ddp).items())):
        assert i == j and x[0] == pytest.approx(y[0], rel=1e-4), (i, x, y)
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == c[key].keys()
        for name in a[key]:
            torch.testing.assert_close(a[key][name], c[key][name], rtol=1e-3, atol=2e-3, msg=f"{key} {name}")
    # The checkpoint's state_dict is the average, not the raw weights.
    raw = a["ema_state_dict"]
    assert any(not torch.equal(v, raw[f"module.{k}"]) for k, v in a["state_dict"].items() if v.is_floating_point())

    out = subprocess.run([sys.executable, "tools/publish_model.py", str(fsdp / "epoch_2.pth"),
                          str(tmp_path / "ema.pth")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    (published,) = tmp_path.glob("ema-*.pth")
    assert_same_state(torch.load(published, map_location="cpu", weights_only=True)["state_dict"], a["state_dict"],
                      "published")


def test_an_error_on_one_rank_ends_the_run_instead_of_hanging(shapes, tmp_path):
    """Rank 1 raises in its third iteration while rank 0 goes on into the next forward's
    collectives: the run must stop with rank 1's error (the teardown barrier after an error
    used to keep rank 1 waiting for rank 0, and rank 0 for rank 1)."""
    config = three_epoch_config(tmp_path, hooks="[dict(type='FailOnOneRankHook')]")
    env = dict(env_for(shapes), PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    log = torchrun(["tools/train.py", str(config), "--launcher", "pytorch", "--strategy", "fsdp", "--work-dir",
                    str(tmp_path / "work")], env, 29651, timeout=180, expect_failure=True)
    assert "injected failure on rank 1" in log


def test_deepspeed_zero1_trains_and_resumes_on_two_cpu_processes(shapes, tmp_path):
    """``--strategy deepspeed-zero1`` with 2 gloo processes on CPU (DeepSpeed's CPU
    accelerator): 2 epochs; 1 epoch then ``--resume`` (a checkpoint folder, found by
    auto-resume) gives the same logged losses."""
    pytest.importorskip("deepspeed")
    config = three_epoch_config(tmp_path)
    env = dict(env_for(shapes), PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}", DS_ACCELERATOR="cpu")
    train = ["tools/train.py", str(config), "--launcher", "pytorch", "--strategy", "deepspeed-zero1", "--work-dir"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    log = torchrun(train + [str(whole), "--cfg-options", "train_cfg.max_epochs=2"], env, 29652)
    assert "FlexibleRunner with DeepSpeedStrategy" in log
    torchrun(train + [str(resumed), "--cfg-options", "train_cfg.max_epochs=1"], env, 29653)
    assert (resumed / "epoch_1.pth").is_dir()  # DeepSpeed's layout: one folder, files per rank
    log = torchrun(train + [str(resumed), "--resume", "--cfg-options", "train_cfg.max_epochs=2"], env, 29654)
    assert "resumed epoch: 1, iter: 2" in log and "Epoch(train) [2][2/2]" in log
    expected = logged_losses(whole)
    assert sorted(expected) == [1, 2, 3, 4]
    assert {i: v[0] for i, v in logged_losses(resumed).items()} == {i: v[0] for i, v in expected.items()}


def test_load_from_under_fsdp_loads_the_weights(shapes, tmp_path):
    """``load_from`` (a classifier: the project's loader; FSDP loads the full state dict and
    each rank keeps its shards): the first logged loss equals the same run's under DDP and
    differs from training without it."""
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    init_default_scope("mmpretrain")
    torch.manual_seed(123)
    model = MODELS.build(Config.fromfile(str(TINY)).model)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "start.pth")
    config = three_epoch_config(tmp_path)
    env = dict(env_for(shapes), PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    one = ["--cfg-options", "train_cfg.max_epochs=1"]
    train = ["tools/train.py", str(config), "--launcher", "pytorch", "--work-dir"]
    torchrun(train + [str(tmp_path / "fsdp"), "--strategy", "fsdp"] + one + [f"load_from={tmp_path / 'start.pth'}"],
             env, 29655)
    torchrun(train + [str(tmp_path / "ddp")] + one + [f"load_from={tmp_path / 'start.pth'}"], env, 29656)
    torchrun(train + [str(tmp_path / "scratch"), "--strategy", "fsdp"] + one, env, 29657)
    fsdp, ddp, scratch = (logged_losses(tmp_path / name)[1][0] for name in ("fsdp", "ddp", "scratch"))
    assert fsdp == pytest.approx(ddp, rel=1e-6) and fsdp != scratch
