#!/usr/bin/env bash
# Sets pymaml up in the current Python environment: torch (only if none is installed), the
# build and test tools, then pymaml itself built against that torch.
#
#   PYTHON=python3          the interpreter to install into
#   PYMAML_TORCH=2.13.0     the torch version to install when none is present (this machine
#                           class has the CPU build of 2.13.0 offline; never let pip resolve
#                           plain `torch`, which pulls gigabytes of CUDA packages)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==${PYMAML_TORCH:-2.13.0}"
fi
"$PY" -m pip install --quiet numpy pybind11 ninja pytest pytest-benchmark tqdm matplotlib pillow
command -v cmake >/dev/null || "$PY" -m pip install --quiet cmake
# No build isolation: compile against the torch installed above, and fetch no other.
"$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
"$PY" -m pymaml info
