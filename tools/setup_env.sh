#!/usr/bin/env bash
# Idempotent set-up of the project environment in .venv:
#   torch/torchvision, mmcv built from its sdist (wheel cached outside the repo),
#   the OpenMMLab stack from requirements.txt, and this project (compiles ops_dcnv3).
# A second run with nothing changed returns in a few seconds.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venv}
MMCV_VERSION=${MMCV_VERSION:-2.1.0}
CACHE_DIR=${INTERNIMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/internimage}
STAMP=$VENV/.internimage-env
PY=$VENV/bin/python
PIP=("$PY" -m pip --disable-pip-version-check)

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

inputs_hash() {
  cat requirements.txt setup.py tools/setup_env.sh \
      $(find ops_dcnv3/csrc -type f | LC_ALL=C sort) 2>/dev/null | sha256sum | cut -c1-16
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(inputs_hash)" ]; then
  log "environment in $VENV is up to date"
  exit 0
fi

# 0. room on disk ---------------------------------------------------------------
# A new .venv takes about 6.5 GB (torch's x86-64 wheel is a CUDA build with its NVIDIA
# libraries), the mmcv build about 1 GB more in the temporary folder; pip fails half way
# through with "No space left on device" otherwise.
free_gb() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 {print int($4 / 1048576)}'; }
need_gb() {  # folder, GB wanted, what for
  local have
  have=$(free_gb "$1")
  [ -z "$have" ] || [ "$have" -ge "$2" ] \
    || die "$have GB free on the disk of $1, $3 needs about $2 GB: free some space (or set VENV=/path on a larger disk) and rerun"
}
if [ ! -x "$PY" ] || ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  mkdir -p "$(dirname "$VENV")"
  need_gb "$(dirname "$VENV")" 8 "a new environment (torch, torchvision, the OpenMMLab stack)"
fi

# 1. virtual environment and build tools --------------------------------------
if [ ! -x "$PY" ]; then
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found; set PYTHON=/path/to/python3.11"
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
req() {  # the requirement line for a package, as pinned in requirements.txt
  grep -E "^$1([=<>!~ ]|$)" requirements.txt | head -n1
}
log "installing build tools"
"${PIP[@]}" install -q --upgrade pip wheel "$(req setuptools)" "$(req ninja)"

# 2. torch --------------------------------------------------------------------
log "installing $(req torch) $(req torchvision)"
"${PIP[@]}" install -q "$(req torch)" "$(req torchvision)"
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')

# CUDA builds need a toolkit and either a visible GPU or FORCE_CUDA=1
# (the same rule as mmcv's and this project's setup.py).
BUILD_KIND=$("$PY" - <<'PYEOF'
import os, torch
from torch.utils.cpp_extension import CUDA_HOME
want = torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"
print(f"cu{torch.version.cuda.replace('.', '')}" if want and CUDA_HOME and torch.version.cuda else "cpu")
PYEOF
)
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

# 3. mmcv, built once and cached ---------------------------------------------
mmcv_ok() {
  "$PY" - "$MMCV_VERSION" <<'PYEOF' 2>/dev/null
import sys, mmcv
assert mmcv.__version__ == sys.argv[1]
from mmcv.ops import nms  # compiled ops present
PYEOF
}

build_mmcv() {
  local wheel_dir=$1 work log_file std
  work=$(mktemp -d)
  log_file=$CACHE_DIR/logs/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$BUILD_KIND.log
  mkdir -p "$CACHE_DIR/logs"
  log "fetching the mmcv $MMCV_VERSION sdist"
  "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation \
      -d "$work" "mmcv==$MMCV_VERSION" || die "could not download the mmcv==$MMCV_VERSION sdist"
  tar -xzf "$work"/mmcv-"$MMCV_VERSION".tar.gz -C "$work"
  local src=$work/mmcv-$MMCV_VERSION
  # mmcv's setup.py hard-codes -std=c++17; newer torch headers need C++20.
  std=$("$PY" "$ROOT/tools/torch_cxx_std.py")
  sed -i "s/-std=c++17/-std=$std/g" "$src/setup.py"
  log "building mmcv $MMCV_VERSION for torch $TORCH_VERSION ($BUILD_KIND, -std=$std);"
  log "  this takes about 10 minutes on 2 cores, once; log: $log_file"
  (cd "$src" && MAX_JOBS=${MAX_JOBS:-$(nproc)} MMCV_WITH_OPS=1 \
      "${PIP[@]}" wheel -v --no-deps --no-build-isolation -w "$work/dist" . >"$log_file" 2>&1) &
  local pid=$! start=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 20
    local step
    step=$(grep -oE '\[[0-9]+/[0-9]+\]' "$log_file" | tail -n1 || true)
    log "  mmcv build: ${step:-configuring} after $((SECONDS - start)) s"
  done
  if ! wait "$pid"; then
    printf '[setup] mmcv build FAILED. Last compiler messages:\n' >&2
    (grep -E 'error|Error' "$log_file" | tail -n 15; echo '...'; tail -n 15 "$log_file") >&2
    printf '[setup] Full log: %s\n' "$log_file" >&2
    printf '[setup] Try: a C++20-capable gcc (>= 10), `pip install "setuptools>=77,<81"` in .venv,\n' >&2
    printf '[setup]      MAX_JOBS=1 if the compiler ran out of memory.\n' >&2
    exit 1
  fi
  mkdir -p "$wheel_dir"
  mv "$work"/dist/mmcv-*.whl "$wheel_dir"/
  rm -rf "$work"
  log "mmcv built in $((SECONDS - start)) s; wheel cached in $wheel_dir"
}

if mmcv_ok; then
  log "mmcv $MMCV_VERSION already installed"
else
  WHEEL_DIR=$CACHE_DIR/wheels/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$BUILD_KIND-$PY_TAG
  if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
    need_gb "${TMPDIR:-/tmp}" 2 "the mmcv build"
    build_mmcv "$WHEEL_DIR"
  else
    log "using cached mmcv wheel from $WHEEL_DIR"
  fi
  "${PIP[@]}" uninstall -q -y mmcv mmcv-lite >/dev/null 2>&1 || true
  "${PIP[@]}" install -q "$WHEEL_DIR"/mmcv-*.whl "$(req mmengine)" "$(req setuptools)"
  mmcv_ok || die "mmcv $MMCV_VERSION installed but mmcv.ops does not import; remove $WHEEL_DIR and rerun"
fi

# 4. the rest of the stack, and this project --------------------------------
log "installing requirements.txt"
"${PIP[@]}" install -q -r requirements.txt
log "building and installing this project (ops_dcnv3 extension)"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e . \
  || die "building ops_dcnv3 failed; rerun '$PY -m pip install -v --no-build-isolation -e .' to see the compiler output"
"$PY" -c 'import ops_dcnv3, internimage, mmcv, mmdet, mmseg, mmengine, torch
print(f"[setup] ready: torch {torch.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, "
      f"mmdet {mmdet.__version__}, mmseg {mmseg.__version__}")'
inputs_hash >"$STAMP"
