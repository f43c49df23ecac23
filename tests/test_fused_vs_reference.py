"""The fused op against the pure-autograd oracle on many seeded random configurations:
query loss, meta-gradient, adapted parameters and the adapt VJP, in float64 and float32."""

import pytest
import torch

from pymaml import functional as F
from pymaml.testing import LARGE, backend_outputs, paper_problems

from conftest import assert_matches, random_problem, requires_fused

pytestmark = requires_fused

DTYPES = [torch.float64, torch.float32]


def check(pb, dtype, seed=None):
    fused, ref = backend_outputs(pb, "fused"), backend_outputs(pb, "reference")
    for key in ref:
        try:
            assert_matches(fused[key], ref[key], dtype, key)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}, {pb.hyper}: {e}") from None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", range(8))
def test_random_small(dtype, block):
    # 8 blocks x 40 seeds = 320 configurations per dtype.
    for seed in range(block * 40, (block + 1) * 40):
        check(random_problem(seed, dtype), dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_large(dtype):
    # Deeper, wider networks and longer inner loops.
    for seed in range(1000, 1012):
        check(random_problem(seed, dtype, **LARGE), dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paper_workloads(dtype):
    # The seed's (1-32-32-1, L1, K=Q=4, S=5) and the MAML paper's (1-40-40-1, MSE, K=10, S=5).
    for pb in paper_problems(dtype):
        check(pb, dtype)


def test_many_tasks_reduce_in_order():
    # T identical tasks: the mean meta-gradient equals the one-task meta-gradient, whatever the
    # blocking of the reduction (T above the block count).
    pb = random_problem(3, torch.float64, max_tasks=1)
    one = pb.params.clone().requires_grad_()
    F.maml_loss(one, *pb.data, backend="fused", **pb.hyper).backward()
    T = 3001
    many = pb.params.clone().requires_grad_()
    data = [t.expand(T, *t.shape[1:]) for t in pb.data]  # non-contiguous on purpose
    loss = F.maml_loss(many, *data, backend="fused", **pb.hyper)
    loss.backward()
    torch.testing.assert_close(many.grad, one.grad, rtol=1e-12, atol=1e-12)
