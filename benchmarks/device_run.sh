#!/usr/bin/env bash
# The one GPU run, as a single command on the device machine (benchmarks/README.md, "The one
# GPU run"). Installs the carried wheels (benchmarks/device_wheels.sh) into /tmp/site, puts the
# checkout on PYTHONPATH (vidsparse is not pip-installed there), and runs the budgeted suite
# into $OUT/suite (a timeout keeps every finished stage: the JSON is rewritten after each case).
# Extra arguments go to the suite, e.g. `--stages attention-wan-14b` for a rerun, or
# `--dry-run` to try this script on a CPU machine (with TRITON_INTERPRET=1).
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"  # the device's python3 holds torch; tests pass their own
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/vidsparse-device}/suite"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null | tee "$out/nvidia_smi.txt"
"$py" benchmarks/gpu_suite.py --budget-s "${BUDGET_S:-480}" --out-dir "$out" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
