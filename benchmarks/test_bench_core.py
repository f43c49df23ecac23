"""Fused vs reference, side by side in one run: the time of one meta-iteration (meta-gradient
plus the outer optimizer step) on the seed's workload and the MAML paper's.

    python -m pytest benchmarks --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

W1, the seed: 1-32-32-1 ReLU, L1, K=Q=4, S=5, T=1, SGD(1e-2), second order.
W2, the MAML paper: 1-40-40-1 ReLU, MSE, K=Q=10, S=5, T=25, Adam(1e-3), second order.
One thread, except the W2-paper-threads group (fused, one and two threads).
"""

import math

import pytest
import torch

from pymaml import functional as F
import pymaml

WORKLOADS = {
    "W1-seed": dict(sizes=[1, 32, 32, 1], loss="l1", K=4, T=1, steps=5, inner_lr=3e-2,
                    opt=lambda p: torch.optim.SGD([p], lr=1e-2)),
    "W2-paper": dict(sizes=[1, 40, 40, 1], loss="mse", K=10, T=25, steps=5, inner_lr=1e-2,
                     opt=lambda p: torch.optim.Adam([p], lr=1e-3)),
}
BACKENDS = ["fused", "reference"] if pymaml.fused_available() else ["reference"]


def make_step(name, backend):
    w = WORKLOADS[name]
    g = torch.Generator().manual_seed(0)
    params = F.init_params(w["sizes"], generator=g).requires_grad_()
    x = torch.rand(2, w["T"], w["K"], 1, generator=g) * 10 - 5
    y = torch.sin(x)  # the same task data for every backend
    opt = w["opt"](params)
    hyper = dict(sizes=w["sizes"], inner_lr=w["inner_lr"], steps=w["steps"], activation="relu",
                 loss=w["loss"], backend=backend)

    def step():
        opt.zero_grad()
        loss = F.maml_loss(params, x[0], y[0], x[1], y[1], **hyper)
        loss.backward()
        opt.step()
        return loss

    return step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_meta_iteration(benchmark, workload, backend):
    benchmark.group = workload
    benchmark.extra_info.update(workload=workload, backend=backend)
    step = make_step(workload, backend)
    loss = benchmark(step)
    assert math.isfinite(loss.item())


@pytest.mark.skipif(not pymaml.fused_available(), reason="pymaml._C is not built")
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_threads(benchmark, threads):
    # Tasks are spread over threads: W2 (T=25) with one and two threads, side by side.
    torch.set_num_threads(threads)  # the autouse fixture restores the count afterwards
    benchmark.group = "W2-paper-threads"
    benchmark.extra_info.update(workload="W2-paper", backend="fused", threads=threads)
    loss = benchmark(make_step("W2-paper", "fused"))
    assert math.isfinite(loss.item())
