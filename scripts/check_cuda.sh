#!/usr/bin/env bash
# Compile checks of the CUDA sources, for machines without a GPU (scripts/test.sh runs it):
#   1. the torch-free kernel layer (csrc/cuda/*.cu) with nvcc for sm_90 (H100) and sm_80
#      (A100), every warning an error; sm_90 with the flags torch's BuildExtension gives for
#      setup.py's default without a GPU, TORCH_CUDA_ARCH_LIST=9.0+PTX, and the object must then
#      carry both the sm_90 machine code and the compute_90 PTX (scripts/fatbin_images.py);
#   2. the torch binding (csrc/cuda/*.cpp) with the host compiler against the installed torch's
#      headers (it uses device-generic c10 APIs only, so a CPU-only torch will do), -Werror;
#   3. a link of both with the argument checks into a shared library with no undefined
#      symbols, loaded into torch after pymaml._C: the CUDA kernels must register against the
#      op schemas (the dispatcher checks each kernel's signature against its schema).
# Skipped, with a message, when nvcc is not found. NVCC=... picks the compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  for candidate in "$(command -v nvcc || true)" "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then NVCC=$candidate; break; fi
  done
fi
if [ -z "$NVCC" ]; then
  echo "check_cuda: nvcc not found (set NVCC or CUDA_HOME); skipping the CUDA compile checks"
  exit 0
fi
# The toolkit's root, as nvcc itself reports it (nvcc may be a wrapper script elsewhere).
CUDA_ROOT=$("$NVCC" --dryrun -x cu -c /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
CUDA_ROOT=$(cd "${CUDA_ROOT:-$(dirname "$(dirname "$NVCC")")}" && pwd -P)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

# 1. the kernel layer, both architectures at once (one per core). sm_90: torch's own flags for
# setup.py's no-GPU default (sm_90 code + compute_90 PTX), falling back to the same by hand if
# torch's private helper moves.
read -r -a sm90_flags < <(TORCH_CUDA_ARCH_LIST=9.0+PTX "$PY" -c "
from torch.utils.cpp_extension import _get_cuda_arch_flags
print(' '.join(_get_cuda_arch_flags()))" 2>/dev/null ||
  echo "-gencode=arch=compute_90,code=compute_90 -gencode=arch=compute_90,code=sm_90")
pids=()
for arch in sm_90 sm_80; do
  if [ $arch = sm_90 ]; then flags=("${sm90_flags[@]}"); else flags=(-arch=$arch); fi
  "$NVCC" -std=c++17 -O3 "${flags[@]}" -Werror all-warnings -Xcompiler -Wall,-Wextra,-fPIC \
    -c csrc/cuda/maml_cuda.cu -o "$tmp/maml_cuda_$arch.o" &
  pids+=($!)
done

# 2. the binding and the argument checks it links with, against torch's headers
read -r TORCH_INCLUDES TORCH_LIB < <("$PY" -c "
import os, torch.utils.cpp_extension as c
print(':'.join(c.include_paths()), os.path.join(os.path.dirname(c.__file__), '..', 'lib'))")
includes=()
IFS=: read -r -a dirs <<<"$TORCH_INCLUDES"
for d in "${dirs[@]}"; do includes+=(-isystem "$d"); done
includes+=(-isystem "$CUDA_ROOT/include")
CXX=${CXX:-g++}
for src in csrc/cuda/maml_cuda_ops.cpp csrc/op_args.cpp; do
  "$CXX" -std=c++17 -O1 -fPIC -Wall -Wextra -Werror "${includes[@]}" -c "$src" \
    -o "$tmp/$(basename "$src" .cpp).o"
done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "check_cuda: sm_90 flags: ${sm90_flags[*]}; images in the object:"
"$PY" scripts/fatbin_images.py "$tmp/maml_cuda_sm_90.o" --require sm_90:elf --require sm_90:ptx

# 3. link (no undefined symbols) and register the kernels
"$CXX" -shared -o "$tmp/libpymaml_cuda_check.so" "$tmp/maml_cuda_sm_90.o" "$tmp/maml_cuda_ops.o" \
  "$tmp/op_args.o" -L"$TORCH_LIB" -lc10 -ltorch_cpu -L"$CUDA_ROOT/lib64" -lcudart \
  -Wl,--no-undefined -Wl,-rpath,"$CUDA_ROOT/lib64" -Wl,-rpath,"$TORCH_LIB"
"$PY" - "$tmp/libpymaml_cuda_check.so" <<'PYEOF'
import sys
import torch
import pymaml._C  # noqa: F401  (the op schemas)
if pymaml._C.cuda_compiled:
    print("check_cuda: pymaml._C already carries CUDA kernels; registration check skipped")
    sys.exit(0)
torch.ops.load_library(sys.argv[1])
for op in ("adapt", "adapt_backward", "maml_loss"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pymaml::{op}", "CUDA"), op
PYEOF
echo "check_cuda: kernel layer (sm_90 + PTX, sm_80), binding, link and registration OK" \
  "($((SECONDS - start)) s)"
