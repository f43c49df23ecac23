"""The first thing to run on a GPU (scripts/gpu_check.sh runs it with CUDA_LAUNCH_BLOCKING=1, so
that a failing launch is reported by the call that made it): a few tiny problems, each through
the CUDA op and against the CPU op and the reference (loss, meta-gradient, adapted parameters
and adapt's VJP: pymaml.testing.backend_outputs), in seconds.

    CUDA_LAUNCH_BLOCKING=1 python scripts/cuda_smoke.py

The cases (issue 16):
  w2-float32     W2 (1-40-40-1, MSE, K=Q=10, S=5), T=3: its workspace (181 KB) in shared memory
                 with the opt-in (an H100/H200 allows 227 KB);
  w2-float64     the same in float64 (363 KB): the global-memory workspace;
  window-float64 1-12-12-1, S=4, K=Q=8: 48,768 bytes of workspace, under 48 KB alone but over
                 it with the kernel's static shared memory (launch failed before issue 16's fix);
  window-float32 1-22-22-1, S=4, K=Q=5: 49,124 bytes, the same window;
  window-*-global the two window sizes again with PYMAML_CUDA_WORKSPACE=global: the same bits.
Prints one line per case (worst relative difference against each, seconds) and the worst per
dtype; exits 1 if any case fails or differs by more than the test suite's tolerance
(max |diff| / max(1, max |ref|): float64 1e-10, float32 1e-4), 2 if there is no GPU to run on.
"""

import os
import sys
import time
import traceback

import torch

import pymaml
from pymaml import functional as F
from pymaml.testing import Problem, backend_outputs, relative_error, to_device

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}  # tests/conftest.py's


def sine_problem(sizes, dtype, *, steps, points, tasks=3, loss="mse", activation="relu"):
    g = torch.Generator().manual_seed(sum(sizes) + steps + points)
    x = (torch.rand(2, tasks, points, sizes[0], generator=g, dtype=torch.float64) * 10 - 5)
    return Problem(sizes=sizes, activation=activation, loss=loss, inner_lr=0.01, steps=steps,
                   first_order=False,
                   params=F.init_params(sizes, generator=g, dtype=torch.float64).to(dtype),
                   xs=x[0].to(dtype), ys=torch.sin(x[0]).to(dtype),
                   xq=x[1].to(dtype), yq=torch.sin(x[1]).to(dtype))


CASES = [
    ("w2-float32", sine_problem([1, 40, 40, 1], torch.float32, steps=5, points=10), None),
    ("w2-float64", sine_problem([1, 40, 40, 1], torch.float64, steps=5, points=10), None),
    ("window-float64", sine_problem([1, 12, 12, 1], torch.float64, steps=4, points=8), None),
    ("window-float32", sine_problem([1, 22, 22, 1], torch.float32, steps=4, points=5), None),
    ("window-float64-global", sine_problem([1, 12, 12, 1], torch.float64, steps=4, points=8),
     "window-float64"),
    ("window-float32-global", sine_problem([1, 22, 22, 1], torch.float32, steps=4, points=5),
     "window-float32"),
]


def main():
    if not (torch.cuda.is_available() and pymaml.cuda_compiled()):
        print("cuda_smoke: needs a GPU and pymaml built with its CUDA kernels "
              f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
              f"pymaml.cuda_compiled()={pymaml.cuda_compiled()})")
        return 2
    print(f"cuda_smoke: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"CUDA_LAUNCH_BLOCKING={os.environ.get('CUDA_LAUNCH_BLOCKING', '')}")
    os.environ.pop("PYMAML_CUDA_WORKSPACE", None)
    failed, worst, results = [], {}, {}
    for name, pb, same_bits_as in CASES:
        dtype = pb.params.dtype
        start = time.perf_counter()
        try:
            if same_bits_as:
                os.environ["PYMAML_CUDA_WORKSPACE"] = "global"
            got = backend_outputs(to_device(pb, "cuda"), "fused")
            torch.cuda.synchronize()
            os.environ.pop("PYMAML_CUDA_WORKSPACE", None)
            errs = {}
            for other in ("fused", "reference"):  # on the CPU: the CPU op, the reference
                expected = backend_outputs(pb, other)
                errs[other] = max(relative_error(got[k], expected[k]) for k in expected)
            line = "  ".join(f"vs cpu {o} {e:.3g}" for o, e in errs.items())
            ok = all(e <= TOL[dtype] for e in errs.values())
            if same_bits_as:
                bits = all(torch.equal(got[k].cpu(), results[same_bits_as][k].cpu()) for k in got)
                line += f"  same bits as {same_bits_as}: {bits}"
                ok = ok and bits
            results[name] = got
            for e in errs.values():
                worst[dtype] = max(worst.get(dtype, 0.0), e)
        except Exception:  # report every case, then fail
            os.environ.pop("PYMAML_CUDA_WORKSPACE", None)
            line, ok = "ERROR\n" + traceback.format_exc(), False
        took = time.perf_counter() - start
        print(f"{'ok  ' if ok else 'FAIL'} {name:22s} {line}  ({took:.2f} s)", flush=True)
        if not ok:
            failed.append(name)
    for dtype, e in worst.items():
        print(f"worst relative difference, {dtype}: {e:.3g} (tolerance {TOL[dtype]:g})")
    print("cuda_smoke:", f"FAILED {failed}" if failed else f"all {len(CASES)} cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
