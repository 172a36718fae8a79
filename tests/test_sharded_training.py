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


def torchrun(args, env, port, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
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


def test_fsdp_strategy_config_and_ema_refused():
    cfg = Config.fromfile(str(TINY))
    with pytest.raises(SystemExit, match="EMAHook"):
        apply_strategy(cfg, "fsdp")
    cfg.custom_hooks = [dict(type="ClassCountCheckHook")]
    optim_before = cfg.optim_wrapper.to_dict()
    apply_strategy(cfg, "fsdp")
    assert cfg.runner_type == "FlexibleRunner"
    assert cfg.strategy.type == "InternImageFSDPStrategy" and cfg.strategy.state_dict_cfg == "full"
    assert cfg.strategy.model_wrapper.use_orig_params is True
    assert cfg.optim_wrapper.to_dict() == optim_before


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
    assert cfg.runner_type == "FlexibleRunner" and cfg.strategy.type == "DeepSpeedStrategy"
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
