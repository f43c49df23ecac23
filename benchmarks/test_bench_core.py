"""The fused op, the autograd reference and torch.func side by side in one pytest-benchmark run:
the time of one meta-iteration (meta-gradient plus the outer optimizer step) on the issue's
workloads, with the workloads and implementations of pymaml/bench.py.

    python -m pytest benchmarks --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Groups: W1 (the seed: 1-32-32-1 ReLU, L1, K=Q=4, S=5, T=1, SGD) and W2 (the MAML paper: 1-40-40-1
ReLU, MSE, K=Q=10, T=25, Adam) with S=5 and S=1, second and first order; one thread (see
conftest.py), except "threads", the fused op on W2 with T=25 and T=64 on one and two threads.
Sizes stay small so the smoke pass (`pytest benchmarks --benchmark-disable`, in
scripts/test.sh) takes seconds; the sweeps in T, S and width, peak memory, the GFLOP/s and the
targets are `python -m pymaml bench`.
"""

import functools
import math

import pytest
import torch

from pymaml import bench

WORKLOADS = [w.replace(first_order=fo) for w in (bench.W1, bench.W2, bench.W2.replace(S=1))
             for fo in (False, True)]
IDS = [f"{w.label()}-{w.order}" for w in WORKLOADS]


@functools.lru_cache(maxsize=None)
def oracle_grad(w):
    """The reference's meta-gradient at the workload's starting weights."""
    batch, params = bench.make_data(w)
    return bench.make_implementation("reference", w, batch, params).meta_grad()[1]


def build(w, impl):
    batch, params = bench.make_data(w)
    reason = bench._unavailable(impl, w, params)
    if reason:
        pytest.skip(reason)
    return bench.make_implementation(impl, w, batch, params)


@pytest.mark.parametrize("impl", bench.IMPLEMENTATIONS)
@pytest.mark.parametrize("w", WORKLOADS, ids=IDS)
def test_meta_iteration(benchmark, w, impl):
    implementation = build(w, impl)
    # Time only what agrees with the reference.
    check = bench.verify({"reference": oracle_grad(w), impl: implementation.meta_grad()[1]})[impl]
    assert check["ok"], f"{impl}'s meta-gradient differs from the reference's by {check['error']:.3g}"
    benchmark.group = f"{w.label()} {w.order} order"
    benchmark.extra_info.update(workload=w.label(), order=w.order, impl=impl,
                                flops=bench.meta_iteration_flops(w))
    benchmark(implementation.step)
    assert torch.isfinite(implementation.params).all()
    assert math.isfinite(implementation.meta_grad()[0].item())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T", [25, 64])
def test_fused_threads(benchmark, T, threads):
    # Tasks are spread over threads: the fused op with one and two threads, side by side.
    w = bench.W2.replace(T=T)
    implementation = build(w, "fused")
    torch.set_num_threads(threads)  # the autouse fixture restores one thread afterwards
    benchmark.group = f"threads {w.label()}"
    benchmark.extra_info.update(workload=w.label(), impl="fused", threads=threads)
    benchmark(implementation.step)
    assert torch.isfinite(implementation.params).all()
