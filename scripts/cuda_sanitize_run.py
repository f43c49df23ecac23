"""A tiny run of every CUDA kernel for compute-sanitizer (scripts/gpu_check.sh runs it under
racecheck and synccheck): each op (maml_loss with and without the meta-gradient, second and
first order; adapt; adapt_backward; the chunk reduction after maml_loss and adapt_backward),
each dtype, activation and loss, with the workspace in shared memory and in global memory
(PYMAML_CUDA_WORKSPACE=global), once, on a 1-8-8-1 network with T=3, K=Q=4, S=2: 32 calls of
each op, small enough for the sanitizer's slow-down. It checks no numbers (the smoke test and
the CUDA tests do); it exits 1 if a call raises, 2 without a GPU.

    compute-sanitizer --tool racecheck --error-exitcode 3 python scripts/cuda_sanitize_run.py
"""

import itertools
import os
import sys

import torch

import pymaml
from pymaml import functional as F


def main():
    if not (torch.cuda.is_available() and pymaml.cuda_compiled()):
        print("cuda_sanitize_run: needs a GPU and pymaml built with its CUDA kernels")
        return 2
    sizes, T, K, S = [1, 8, 8, 1], 3, 4, 2
    calls = 0
    for workspace, dtype, activation, loss, first_order in itertools.product(
            ("shared", "global"), (torch.float32, torch.float64), ("relu", "tanh"),
            ("mse", "l1"), (False, True)):
        if workspace == "global":
            os.environ["PYMAML_CUDA_WORKSPACE"] = "global"
        else:
            os.environ.pop("PYMAML_CUDA_WORKSPACE", None)
        g = torch.Generator().manual_seed(calls)
        xs, xq = (torch.randn(T, K, 1, generator=g, dtype=torch.float64).to(dtype).cuda()
                  for _ in "ab")
        ys, yq = torch.sin(xs), torch.cos(xq)
        hyper = dict(sizes=sizes, inner_lr=0.05, steps=S, activation=activation, loss=loss,
                     first_order=first_order, backend="fused")
        p = F.init_params(sizes, generator=g, dtype=dtype).cuda().requires_grad_()
        value = F.maml_loss(p, xs, ys, xq, yq, **hyper)          # loss + meta-gradient
        torch.autograd.grad(value, p)
        with torch.no_grad():
            F.maml_loss(p, xs, ys, xq, yq, **hyper)               # the loss alone
        adapted = F.adapt(p, xs, ys, **hyper)                      # adapt
        torch.autograd.grad(adapted, p, torch.ones_like(adapted))  # adapt_backward
        torch.cuda.synchronize()
        calls += 1
    os.environ.pop("PYMAML_CUDA_WORKSPACE", None)
    print(f"cuda_sanitize_run: {calls} configurations, every op once each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
