"""A support batch per inner step (x_support [T, steps, K, n]: step k trains on batch k, as
Reptile's minibatches and DAML's fresh source inputs do): the fused ops against the autograd
reference on random problems (loss, meta-gradient, adapted weights, the adapt VJP, Reptile's
direction), equal to a shared batch when every step's batch is the same, and the errors."""

import pytest
import torch

from pymaml import functional as F
from pymaml.testing import backend_outputs

from conftest import assert_matches, random_problem, requires_fused

pytestmark = requires_fused
ops = torch.ops.pymaml
DTYPES = [torch.float64, torch.float32]


def per_step(pb, seed):
    """pb with a fresh support batch per inner step (steps >= 1)."""
    pb.steps = max(pb.steps, 1)
    g = torch.Generator().manual_seed(seed)
    T, K = pb.xs.shape[:2]
    rand = lambda n: torch.randn(T, pb.steps, K, n, generator=g, dtype=torch.float64).to(pb.xs.dtype)
    pb.xs, pb.ys = rand(pb.sizes[0]), rand(pb.sizes[-1])
    return pb


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_matches_the_reference(dtype):
    for seed in range(80):
        pb = per_step(random_problem(seed, dtype), seed)
        fused, reference = backend_outputs(pb, "fused"), backend_outputs(pb, "reference")
        for key in reference:
            assert_matches(fused[key], reference[key], dtype, f"seed {seed}: {key}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reptile_direction_matches_the_reference(dtype):
    for seed in range(20):
        pb = per_step(random_problem(seed, dtype), seed)
        hyper = (pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss)
        _, direction = ops.reptile(pb.params, *pb.data, *hyper)
        adapted = F.adapt(pb.params, pb.xs, pb.ys, backend="reference", **pb.hyper)
        assert_matches(direction, pb.params - adapted.mean(0), dtype, f"seed {seed}")


def test_the_same_batch_every_step_is_the_shared_batch():
    pb = random_problem(5, torch.float64)
    pb.steps = 3
    shared = backend_outputs(pb, "fused")
    pb.xs, pb.ys = (t.unsqueeze(1).expand(-1, 3, -1, -1).contiguous() for t in (pb.xs, pb.ys))
    repeated = backend_outputs(pb, "fused")
    for key in shared:
        assert torch.equal(shared[key], repeated[key]), key


@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_a_batch_count_other_than_steps_is_refused(backend):
    pb = per_step(random_problem(2, torch.float64), 2)
    xs, ys = pb.xs[:, :1].repeat(1, pb.steps + 1, 1, 1), pb.ys[:, :1].repeat(1, pb.steps + 1, 1, 1)
    with pytest.raises(ValueError, match="batch per inner step"):
        F.maml_loss(pb.params, xs, ys, pb.xq, pb.yq, backend=backend, **pb.hyper)
    with pytest.raises(ValueError, match="same number of points"):
        F.adapt(pb.params, pb.xs, pb.ys[:, 0], backend=backend, **pb.hyper)
