"""The benchmark scripts' code paths on tiny inputs (the real runs take minutes)."""
import importlib.util
from pathlib import Path

import pytest
import torch

import ops_dcnv3

REPO = Path(__file__).resolve().parents[1]


def load_tool(name):
    """A script of tools/ as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = load_tool("benchmark")
benchmark_dcnv3 = load_tool("benchmark_dcnv3")


@pytest.mark.parametrize("mode", ["inference", "train", "backbone", "bf16"])
def test_benchmark_steps_run(mode):
    model = benchmark.build("internimage_t", mode)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    benchmark.make_step(model, mode, 2, 64, 64)()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    if mode == "train":  # the step updated the weights (the zero-initialised offset/mask projections too)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert "levels.0.blocks.0.dcn.offset.weight" in changed and "head.weight" in changed
    else:
        assert not changed


def test_benchmark_dcnv3_cpu_timing_and_work():
    for impl in benchmark_dcnv3.IMPLS.values():
        for mode in ("forward", "forward+backward"):
            assert benchmark_dcnv3.time_op(impl, mode, 7, 64, 4, repeats=1) > 0
    moved, macs = benchmark_dcnv3.forward_work(56, 128, 4, batch=64)
    assert moved == 4 * 64 * 56 * 56 * (2 * 128 + 4 * 9 * 3) and macs == 64 * 56 * 56 * 9 * 128 * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_benchmark_dcnv3_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(SystemExit, match="no CUDA device"):
        benchmark_dcnv3.cuda_main(type("Args", (), {"repeats": 1, "json": None})())


def test_benchmark_times_models_round_robin():
    times = benchmark.time_models(["internimage_t", "internimage_t_reference"], ("tiny", 1, 64, 64, "inference"), 2)
    assert set(times) == {"internimage_t", "internimage_t_reference"} and all(t > 0 for t in times.values())


def test_benchmark_times_float32_and_bfloat16_cases_in_one_round_robin():
    cases = [("tiny fp32", 1, 64, 64, "inference"), ("tiny bf16", 1, 64, 64, "bf16")]
    times = benchmark.time_cases(["internimage_t", "convnext_tiny"], cases, 1)
    assert set(times) == {(c[0], m) for c in cases for m in ("internimage_t", "convnext_tiny")}
    assert all(t > 0 for t in times.values())
    agreement = benchmark.top1_agreement("internimage_t", images=2, batch=2, size=64)
    assert 0 <= agreement["top1_agreement"] <= 1 and 0 <= agreement["max_rel_logit_diff"] < 0.5
    env = benchmark.environment()
    assert env["dcnv3_cpu_isa"] == ops_dcnv3.cpu_isa() and env["cpu"] and isinstance(env["onednn_native_bf16"], bool)


def test_benchmark_dcnv3_dtype_table_per_isa():
    rows = benchmark_dcnv3.dtype_isa_rows(ops_dcnv3.supported_cpu_isas()[:2], batch=1, repeats=1)
    assert ops_dcnv3.cpu_isa() == ops_dcnv3.set_cpu_isa("auto")  # the choice in use is restored
    keys = {(r["shape"], r["isa"], r["dtype"], r["mode"]) for r in rows}
    assert len(keys) == len(rows) == 4 * len(ops_dcnv3.supported_cpu_isas()[:2]) * 3 * 2
    assert all(r["ms"] > 0 for r in rows)


def test_benchmark_dcnv3_block_ops_table():
    rows = benchmark_dcnv3.block_op_rows(batch=1, repeats=1)
    assert [(r["shape"], r["op"]) for r in rows] == [
        (name, op) for name, *_ in benchmark_dcnv3.STAGES for op in ("dw_conv_ln_gelu", "add_layer_norm_")]
    assert all(r["fused_ms"] > 0 and r["unfused_ms"] > 0 for r in rows)
    assert all(r["max_abs_diff"] < 1e-4 for r in rows)  # the same results, up to rounding


def test_peak_memory_probe_measures_a_fresh_step():
    # 4 MiB of float32 allocated by the step: the probe sees at least that, and not a model's worth.
    extra = benchmark_dcnv3.peak_extra_memory("ours", "forward", 32, 64, 4, threads=1)
    assert 0 < extra < 64 * 2**20
    mb = benchmark.peak_memory_mb("internimage_t", 0, threads=1)
    assert 1 < mb < 2048


def test_benchmark_dcnv3_cuda_check_catches_a_wrong_kernel():
    # The check that precedes the CUDA timing, on CPU tensors (the C++ kernels stand in).
    error, ok = benchmark_dcnv3.check_against_reference(ops_dcnv3.dcnv3, 7, 32, 2, 1, torch.float32, device="cpu")
    assert ok and error < 1e-5
    error, ok = benchmark_dcnv3.check_against_reference(lambda *args: ops_dcnv3.dcnv3(*args) * 1.01, 7, 32, 2, 1,
                                                        torch.float32, device="cpu")
    assert not ok and 0.009 < error < 0.011
