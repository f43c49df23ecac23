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
"$PY" -m pip install --quiet numpy pybind11 ninja pytest pytest-benchmark pytest-xdist tqdm matplotlib pillow
command -v cmake >/dev/null || "$PY" -m pip install --quiet cmake
# Build only what changed: pymaml installed from this tree with an extension newer than every
# source it is built from is left as it is (a rebuild takes minutes); otherwise install it.
# No build isolation: compile against the torch installed above, and fetch no other.
so=$(ls pymaml/_C*.so 2>/dev/null | head -n 1 || true)
here=$( (cd / && "$PY" -c "import pymaml, os; print(os.path.dirname(pymaml.__file__))") 2>/dev/null || true)
if [ -n "$so" ] && [ "$here" = "$PWD/pymaml" ] \
    && [ -z "$(find csrc setup.py CMakeLists.txt pyproject.toml -newer "$so" -print -quit)" ]; then
  echo "pymaml: the extension $so is newer than every source; not rebuilt"
else
  "$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
fi
"$PY" -m pymaml info
