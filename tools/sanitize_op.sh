#!/usr/bin/env bash
# Runs the DCNv3 operator's bad-input and edge-case tests on a build of ops_dcnv3 with
# AddressSanitizer and UndefinedBehaviorSanitizer (DCNV3_DEBUG=1 in setup.py), and fails
# on any test failure or sanitizer report, from the pytest process or from the child
# processes that some of the tests start.
#
#   tools/sanitize_op.sh [extra pytest arguments]
#
# The sanitized build goes to a copy of the package in a temporary directory, so the
# normal build (ops_dcnv3/_C*.so, used by everyone else's tests) is left alone. It is
# CPU-only (the CUDA kernels are not instrumented) and takes a few minutes on 2 cores.
# Environment: PY (default .venv/bin/python), SELECT (the pytest -k expression),
# KEEP=1 to keep the temporary directory (build log, test log, sanitizer reports).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
SELECT=${SELECT:-"bad_input or bad_sizes or remove_center or non_finite or far_offsets or batch_zero or compiled_op_checks or bands or memory or infinite_mask or deterministic or random_cases"}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dcnv3-sanitize.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then
  echo "[sanitize] keeping $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi

# 1. Sanitized build in a copy of the package. No GPU visible: setup.py then builds the
# CPU extension, whose C++ is what the sanitizers instrument.
mkdir -p "$WORK/src/internimage" "$WORK/reports"
cp -r "$ROOT/ops_dcnv3" "$WORK/src/"
rm -f "$WORK/src/ops_dcnv3/"_C*.so
cp "$ROOT/setup.py" "$WORK/src/"
cp "$ROOT/internimage/version.py" "$WORK/src/internimage/"
export CUDA_VISIBLE_DEVICES=
echo "[sanitize] building ops_dcnv3 with -fsanitize=address,undefined (log: $WORK/build.log)"
if ! (cd "$WORK/src" && DCNV3_DEBUG=1 "$PY" setup.py build_ext --inplace --build-temp "$WORK/build") \
    >"$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log"
  echo "[sanitize] FAILED: the sanitized build failed"
  exit 1
fi

# 2. The tests, with the sanitized package first on the path. They run from $WORK
# because `python -m` puts the current directory first on sys.path (the repository root
# would bring back the normal build). Reports go to files, one per process, so that
# those of child processes are seen too.
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:log_path=$WORK/reports/asan"  # Python leaks by design
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$WORK/reports/ubsan"
cd "$WORK"
"$PY" - "$WORK" <<'EOF'
import sys
import ops_dcnv3._C as ext
assert ext.__file__.startswith(sys.argv[1]), f"imported {ext.__file__}, not the sanitized build"
print(f"[sanitize] testing {ext.__file__}")
EOF
status=0
"$PY" -m pytest "$ROOT/tests/test_dcnv3_op.py" -p no:cacheprovider -q -k "$SELECT" "$@" 2>&1 \
  | tee "$WORK/pytest.log" || status=$?

if compgen -G "$WORK/reports/*" >/dev/null; then
  for report in "$WORK"/reports/*; do
    echo "----- $report"
    cat "$report"
  done
  echo "[sanitize] FAILED: sanitizer reports above"
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "[sanitize] FAILED: pytest exited with $status"
  exit "$status"
fi
echo "[sanitize] clean: no sanitizer reports, all selected tests passed"
