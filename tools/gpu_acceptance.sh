#!/usr/bin/env bash
# The whole GPU check of the DCNv3 path in one command, for a fresh machine with one GPU
# (written for 16 cores and an H100/H200: about 8 minutes, set-up included):
#
#   bash tools/gpu_acceptance.sh
#
# 1. environment: GPU (nvidia-smi), CUDA toolkit (nvcc), Python, cores, disk;
# 2. its own virtual environment (.venv-gpu; GPU_VENV to change) with torch/torchvision at the
#    requirements.txt pins, timm, mmengine (pure Python; `import internimage` needs it), numpy,
#    pytest, ninja. No mmcv / mmdet / mmseg: the backbone and classifier do not need them, and
#    building mmcv (tools/setup_env.sh) alone would take longer than this whole check;
# 3. ops_dcnv3 built with CUDA for this GPU's architecture only (TORCH_CUDA_ARCH_LIST from
#    torch.cuda.get_device_capability(), FORCE_CUDA=1, MAX_JOBS=nproc), in place (pip -e);
# 4. tests on the GPU: tests/test_dcnv3_cuda.py (CUDA kernels), tests/test_dcnv3_triton.py
#    (Triton kernels, compiled, on CUDA tensors), tests/test_dcnv3_dispatch.py (backend choice);
# 5. tools/benchmark_dcnv3.py --device cuda --backend both (each kernel checked against the
#    reference, then timed next to it);
# 6. tools/gpu_train_check.py: InternImage-T trained 50 steps in float32 and under bfloat16
#    autocast with each backend, and its gradients compared with the CPU's.
#
# Everything goes to one JSON file ($OUT/gpu_acceptance.json, OUT=gpu_acceptance/ by
# default) with a log per step, and a summary is printed. Exit status 0 only if every step
# passed. Without a visible GPU it checks the environment, says "no GPU visible" and exits
# with status 2 (nothing is installed or built).
#
# Offline machines: pip honours PIP_INDEX_URL / PIP_FIND_LINKS (e.g. a local wheel folder).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV=${GPU_VENV:-$ROOT/.venv-gpu}
OUT=${OUT:-$ROOT/gpu_acceptance}
PY=$VENV/bin/python
START=$SECONDS
mkdir -p "$OUT"
STEPS=$OUT/steps.tsv
: >"$STEPS"

log() { printf '[gpu-acceptance %4ds] %s\n' "$((SECONDS - START))" "$*"; }

# run_step NAME TIMEOUT_S CMD...: runs CMD with its output in $OUT/NAME.log and records
# name, status, seconds and exit code in $STEPS.
run_step() {
  local name=$1 limit=$2 start=$SECONDS code
  shift 2
  log "$name ..."
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  code=$?
  local status=pass
  if [ "$code" -ne 0 ]; then
    status=fail
    [ "$code" -eq 124 ] && status="fail (timed out after ${limit} s)"
    log "$name FAILED (exit $code); last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/    /'
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$code" >>"$STEPS"
  log "$name: $status in $((SECONDS - start)) s"
  return "$code"
}

req() {  # the requirement line for a package, as pinned in requirements.txt
  grep -E "^$1([=<>!~ ]|$)" requirements.txt | head -n1
}

# The summary: steps.tsv, the environment and each step's own JSON, into one file.
report() {
  local python=$PY
  [ -x "$python" ] || python=$PYTHON
  "$python" - "$OUT" "$((SECONDS - START))" <<'PYEOF'
import json, os, sys
import xml.etree.ElementTree as ET

out, total = sys.argv[1], int(sys.argv[2])
steps = []
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, status, seconds, code = line.rstrip("\n").split("\t")
        steps.append(dict(name=name, status=status, seconds=int(seconds), exit_code=int(code),
                          log=os.path.join(out, f"{name}.log")))
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
report = dict(total_seconds=total, budget_seconds=480, environment=load("environment.json"), steps=steps)
junit = os.path.join(out, "tests.xml")
if os.path.exists(junit):
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    report["tests"] = counts
report["benchmark"] = load("benchmark.json")
report["training"] = load("train.json")
gpu_visible = (report["environment"] or {}).get("gpu_visible", False)
report["ok"] = gpu_visible and bool(steps) and all(s["status"] == "pass" for s in steps)
json.dump(report, open(os.path.join(out, "gpu_acceptance.json"), "w"), indent=2)

print("\n==================== GPU acceptance summary ====================")
env = report["environment"] or {}
print(f"GPU: {env.get('gpu') or 'none'}; nvcc: {env.get('nvcc') or 'none'}; python {env.get('python')}; "
      f"{env.get('cores')} cores")
if not gpu_visible:
    print("no GPU visible: nothing was installed, built or run on a GPU")
for s in steps:
    print(f"  {s['name']:<12} {s['status']:<10} {s['seconds']:>5} s   {s['log']}")
if "tests" in report:
    t = report["tests"]
    print(f"tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped")
bench = report["benchmark"]
if bench:
    print(f"benchmark: {len(bench['rows'])} rows, implementations {', '.join(bench['implementations'])}, "
          f"mismatches: {len(bench['mismatches'])}")
    for impl in bench["implementations"]:
        speedups = [r[f"{impl}_speedup"] for r in bench["rows"] if f"{impl}_speedup" in r]
        if speedups:
            print(f"  {impl}: speedup over the reference {min(speedups):.1f}x - {max(speedups):.1f}x")
for r in (report["training"] or {}).get("results", []):
    g = r["float32_gradients"]
    print(f"training with {r['backend']} (in use: {r['backend_in_use']}): {'PASS' if r['ok'] else 'FAIL'}; "
          f"float32 gradients vs CPU {g['max_rel_err']:.1e} (tol {g['tolerance']:g}); "
          f"loss fp32 {r['train_float32']['losses'][0]:.2f} -> {r['train_float32']['losses'][-1]:.2f}, "
          f"bf16 {r['train_bfloat16']['losses'][0]:.2f} -> {r['train_bfloat16']['losses'][-1]:.2f}")
print(f"total {total} s (budget 480 s){'' if total <= 480 else ' OVER BUDGET'}")
result = "PASS" if report["ok"] else "FAIL" if gpu_visible else "NOT RUN (no GPU visible)"
print(f"result: {result}; details in {os.path.join(out, 'gpu_acceptance.json')}")
sys.exit(0 if report["ok"] else 1)
PYEOF
}

# 1. environment ----------------------------------------------------------------
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)
NVCC=$(command -v nvcc || { [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; } || true)
"$PYTHON" - "$OUT/environment.json" "$GPU_NAME" "$NVCC" <<'PYEOF'
import json, os, platform, shutil, subprocess, sys
path, gpu, nvcc = sys.argv[1:4]
nvcc_version = None
if nvcc:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    nvcc_version = out.strip().splitlines()[-1] if out.strip() else nvcc
env = dict(gpu_visible=bool(gpu), gpu=gpu or None, nvcc=nvcc_version, python=platform.python_version(),
           cores=os.cpu_count(), free_disk_gb=round(shutil.disk_usage(".").free / 2**30, 1),
           python_ok=sys.version_info >= (3, 9))
json.dump(env, open(path, "w"), indent=2)
PYEOF
if [ -z "$GPU_NAME" ]; then
  log "no GPU visible (nvidia-smi lists none): the GPU checks cannot run here"
  report
  exit 2
fi
if [ -z "$NVCC" ]; then
  log "no CUDA toolkit (nvcc) found: install the one matching torch's CUDA version or set CUDA_HOME"
fi

# 2. virtual environment ------------------------------------------------------
install_env() {
  set -e
  [ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
  local pip=("$PY" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install --upgrade pip wheel "$(req setuptools)" "$(req ninja)"
  "${pip[@]}" install "$(req torch)" "$(req torchvision)"
  "${pip[@]}" install "$(req timm)" "$(req mmengine)" "$(req numpy)" "$(req pytest)"
  "$PY" -c 'import torch, triton; assert torch.cuda.is_available(), "torch sees no GPU (driver too old for its CUDA?)"
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
}
export PY VENV PYTHON
export -f req install_env
run_step install 420 bash -c install_env || { report; exit 1; }

# 3. build ops_dcnv3 for this GPU ---------------------------------------------
build_ops() {
  set -e
  local arch
  arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  echo "TORCH_CUDA_ARCH_LIST=$arch"
  TORCH_CUDA_ARCH_LIST=$arch FORCE_CUDA=1 MAX_JOBS=$(nproc) \
    "$PY" -m pip --disable-pip-version-check install -v --no-deps --no-build-isolation -e .
  "$PY" -c 'import torch, ops_dcnv3
assert torch._C._dispatch_has_kernel_for_dispatch_key("ops_dcnv3::dcnv3_forward", "CUDA"), "built without CUDA"
import internimage; internimage.build_model("internimage_t")
print("ops_dcnv3 with CUDA kernels; internimage builds without mmcv/mmdet/mmseg")'
}
export -f build_ops
run_step build 420 bash -c build_ops || { report; exit 1; }

# 4-6. the checks (each runs even if an earlier one failed) -------------------
# test_cuda_sources_compile rebuilds the CUDA sources in a temporary folder: step 3 just did.
# DCNV3_SELF_CHECK=0 and DCNV3_BACKEND=cuda: tests/test_dcnv3_cuda.py calls ops_dcnv3.dcnv3, and a
# self-check fallback would otherwise let it pass on the Triton kernels (the dispatch tests
# set their own backend and check settings).
run_step tests 420 env DCNV3_SELF_CHECK=0 DCNV3_BACKEND=cuda "$PY" -m pytest -q -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" tests/test_dcnv3_cuda.py tests/test_dcnv3_triton.py tests/test_dcnv3_dispatch.py \
  -k "not test_cuda_sources_compile"
run_step benchmark 300 "$PY" tools/benchmark_dcnv3.py --device cuda --backend both --repeats 10 \
  --json "$OUT/benchmark.json"
run_step training 300 "$PY" tools/gpu_train_check.py --backends cuda triton --iterations 50 --json "$OUT/train.json"

report
