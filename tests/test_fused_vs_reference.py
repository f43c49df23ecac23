"""The fused op against the pure-autograd oracle on many seeded random configurations (query
loss, meta-gradient, adapted parameters and the adapt VJP, in float64 and float32), on every
device: the CPU kernels, and the CUDA kernels where there is a GPU (checked against the CPU
reference and the CPU fused op); then the order of the task reduction and bitwise repeatability."""

import pytest
import torch

from pymaml import functional as F
from pymaml.testing import LARGE, paper_problems, to_device

from conftest import check_fused, random_problem

ops = torch.ops.pymaml


@pytest.mark.parametrize("block", range(8))
def test_random_small(device, dtype, block):
    # 8 blocks x 40 seeds = 320 configurations per dtype and device (random_problem: every
    # activation, loss and order, S in 0..5, 1-4 layers, 1-4 tasks).
    for seed in range(block * 40, (block + 1) * 40):
        check_fused(random_problem(seed, dtype), device, seed)


def test_random_large(device, dtype):
    # Deeper, wider networks and longer inner loops.
    for seed in range(1000, 1012):
        check_fused(random_problem(seed, dtype, **LARGE), device, seed)


@pytest.mark.parametrize("steps", [0, 1, 17, 50, 100])
def test_long_inner_loops(device, dtype, steps):
    # Up to the op's limit of 100 steps, at a small rate so that the inner loop stays finite.
    for seed in (2000, 2001, 2002):
        pb = random_problem(seed, dtype, max_width=16)
        pb.steps, pb.inner_lr = steps, min(pb.inner_lr, 0.01)
        check_fused(pb, device, seed)


def test_paper_workloads(device, dtype):
    # The seed's (1-32-32-1, L1, K=Q=4, S=5, T=1) and the MAML paper's (1-40-40-1, MSE, K=10,
    # S=5, T=25), both orders. On a GPU, W2 in float32 runs with its workspace in shared memory,
    # in float64 in global memory (H100).
    for pb in paper_problems(dtype):
        check_fused(pb, device)


def test_many_tasks_reduce_in_order(device):
    # T identical tasks, T above the CPU's block count and the CUDA kernels' 1024 chunks
    # (several tasks per block or chunk), non-contiguous inputs: the mean meta-gradient equals
    # the one-task meta-gradient whatever the blocking of the reduction, and every task adapts
    # to the same bits.
    pb = to_device(random_problem(3, torch.float64, max_tasks=1), device)
    one = pb.params.clone().requires_grad_()
    F.maml_loss(one, *pb.data, backend="fused", **pb.hyper).backward()
    T = 3001
    many = pb.params.clone().requires_grad_()
    data = [t.expand(T, *t.shape[1:]) for t in pb.data]  # non-contiguous on purpose
    F.maml_loss(many, *data, backend="fused", **pb.hyper).backward()
    torch.testing.assert_close(many.grad, one.grad, rtol=1e-12, atol=1e-12)
    adapted = F.adapt(pb.params, *data[:2], backend="fused", **pb.hyper)
    assert adapted.device.type == torch.device(device).type
    torch.testing.assert_close(adapted, adapted[:1].expand(T, -1), rtol=0, atol=0)


def test_repeated_runs_bitwise_identical(device, dtype):
    # The same call three times gives the same bits, with one task per block or chunk (T=25) and
    # several (T=3000): no atomics, no order that depends on scheduling.
    g = torch.Generator().manual_seed(4)
    sizes = [1, 40, 40, 1]
    params = F.init_params(sizes, generator=g, dtype=dtype).to(device)
    for T in (25, 3000):
        xs, xq = (torch.rand(T, 10, 1, generator=g, dtype=torch.float64).to(dtype).to(device)
                  * 10 - 5 for _ in "ab")
        args = (params, xs, torch.sin(xs), xq, torch.sin(xq), sizes, 0.01, 5, "relu", "mse")
        cot = torch.randn(T, params.numel(), generator=g, dtype=torch.float64).to(dtype).to(device)
        runs = []
        for _ in range(3):
            loss, grad = ops.maml_loss(*args, False, True)
            adapted = ops.adapt(*args[:3], *args[5:], False)
            vjp = ops.adapt_backward(cot, *args[:3], *args[5:])[0]
            runs.append((loss, grad, adapted, vjp))
        assert all(t.device.type == torch.device(device).type for t in runs[0])
        for run in runs[1:]:
            for a, b in zip(run, runs[0]):
                assert torch.equal(a, b)
