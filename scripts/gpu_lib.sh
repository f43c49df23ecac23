# What scripts/gpu_check.sh and scripts/gpu_bench.sh share (sourced, not run): a time budget
# for the whole script, steps each under its own deadline (`timeout`), and every log packed
# into ONE archive under $OUT after every step, so that whatever stops the script (a step's
# deadline, the budget, the machine's own limit) what was done so far comes back.
#
# Set by the caller before sourcing: GPU_SCRIPT (a name). Environment: OUT (default
# ./gpu-check), GPU_CHECK_BUDGET (seconds for the whole script, default 520: under a 9-minute
# call), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-520}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
LOGROOT=$(mktemp -d)
LOG=$LOGROOT/$GPU_SCRIPT   # the archive's one folder
trap 'rm -rf "$LOGROOT"' EXIT
mkdir -p "$LOG"
: > "$LOG/summary.txt"
status=0
export PYTHONUNBUFFERED=1

# pack: $LOG as $OUT/$GPU_SCRIPT.tgz (written aside, then renamed: never half an archive),
# and summary.txt beside it, readable without unpacking.
pack() {
  tar czf "$OUT/.$GPU_SCRIPT.tgz.part" -C "$LOGROOT" "$GPU_SCRIPT" &&
    mv -f "$OUT/.$GPU_SCRIPT.tgz.part" "$OUT/$GPU_SCRIPT.tgz"
  cp -f "$LOG/summary.txt" "$OUT/summary.txt"
}

note() {  # a line in the summary and on the screen
  echo "$*" | tee -a "$LOG/summary.txt"
}

# step NAME DEADLINE TAIL CMD...: runs CMD under `timeout` (DEADLINE seconds, or what is left
# of the budget if less, keeping 5 s to pack), its output to $LOG/NAME.log; the log's last TAIL
# lines to the screen; a summary line "NAME: ok|FAIL (exit N)|TIMEOUT|skipped, T s of D s";
# then packs. Returns CMD's exit status (124: the deadline).
step() {
  local name=$1 limit=$2 tail_lines=$3
  shift 3
  local left=$((BUDGET - SECONDS - 5))
  if [ "$left" -lt 5 ]; then
    note "$name: skipped (budget spent: ${SECONDS} s of ${BUDGET} s)"
    status=1
    pack
    return 125
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (deadline $limit s): $*"
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  tail -n "$tail_lines" "$LOG/$name.log"
  local what="FAIL (exit $rc)"
  [ "$rc" -eq 0 ] && what=ok
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && what="TIMEOUT (deadline $limit s)"
  note "$name: $what, $took s"
  [ "$rc" -eq 0 ] || status=1
  pack
  return "$rc"
}

# Refuse clearly where nothing can be checked (before touching the install).
require_gpu() {
  if ! "$PY" -c "import sys, torch
sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "$GPU_SCRIPT: this torch has no CUDA or sees no GPU: nothing to check here" \
      "(and pymaml is not reinstalled)"
    exit 2
  fi
}

# The machine, the toolchain and which optional tools are there.
machine_facts() {
  {
    date -u
    timeout 20 nvidia-smi || true
    timeout 60 "$PY" -c "import torch
print('torch', torch.__version__, 'CUDA', torch.version.cuda)
print('GPU', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))" || true
    timeout 20 nvcc --version || true
    echo "cores: $(nproc)"
    for tool in cuobjdump compute-sanitizer; do
      echo "$tool: $(command -v "$tool" || echo missing)"
    done
    timeout 30 "$PY" -c "import importlib.util as u
for m in ('pytest', 'pytest_timeout', 'pytest_benchmark', 'jax'):
    print(m, 'present' if u.find_spec(m) else 'missing')"
    git log -1 --oneline 2>/dev/null || true
  } > "$LOG/machine.txt" 2>&1
  cat "$LOG/machine.txt"
  pack
}

# The CUDA kernels are in pymaml._C and the sm_90 machine code and PTX in the binary
# (cuobjdump where the toolkit has it, and scripts/fatbin_images.py, which needs nothing), then
# pymaml's info.
check_image() {
  set -e
  "$PY" -c "import pymaml
assert pymaml.cuda_compiled(), 'pymaml._C was built without its CUDA kernels (see build.log)'
print('pymaml', pymaml.__version__, 'with its CUDA kernels')"
  local so
  so=$(ls pymaml/_C*.so)
  if command -v cuobjdump >/dev/null; then
    cuobjdump --list-elf --list-ptx "$so" | tee "$LOG/images.txt"
    grep -q "sm_90" "$LOG/images.txt" || { echo "cuobjdump: no sm_90 image in $so"; exit 1; }
  fi
  # sm_90 code, and its PTX: torch adds +PTX to the newest visible GPU's architecture, as
  # setup.py's default does where none is visible.
  "$PY" scripts/fatbin_images.py "$so" --require sm_90:elf --require sm_90:ptx
  "$PY" -m pymaml info
}
export -f check_image
export PY LOG

# The build (editable, every core), then check_image. Exits the script if the build fails.
build_and_check_image() {
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if ! step build 240 8 "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
    note "the build failed: see build.log in $OUT/$GPU_SCRIPT.tgz"
    pack
    exit 1
  fi
  step image 30 20 bash -c check_image
}
