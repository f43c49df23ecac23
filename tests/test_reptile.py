"""Reptile on the fused path: torch.ops.pymaml.reptile (the mean query loss after adaptation
and the direction params - mean_t theta_t^S) against the autograd reference on random
problems, the op's registration (opcheck), and pymaml.train's Reptile: its fused weights are
the reference's to the oracle tolerances."""

import pytest
import torch

import pymaml
from pymaml import functional as F
from pymaml import reference

from conftest import assert_matches, random_problem, requires_fused

pytestmark = requires_fused
ops = torch.ops.pymaml
DTYPES = [torch.float64, torch.float32]


def reptile_args(pb):
    return (pb.params, *pb.data, pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss)


def reference_reptile(pb):
    """(query loss after adaptation, params - mean adapted params), by autograd."""
    adapted = reference.adapt(pb.params, pb.xs, pb.ys, sizes=pb.sizes, inner_lr=pb.inner_lr,
                              steps=pb.steps, activation=pb.activation, loss=pb.loss,
                              first_order=True).detach()
    predicted = F.mlp_forward(adapted, pb.xq, sizes=pb.sizes, activation=pb.activation)
    return reference.LOSSES[pb.loss](predicted, pb.yq), pb.params - adapted.mean(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reptile_op_matches_the_reference(dtype):
    for seed in range(120):
        pb = random_problem(seed, dtype)
        value, direction = ops.reptile(*reptile_args(pb))
        expected_value, expected_direction = reference_reptile(pb)
        assert_matches(value, expected_value, dtype, f"seed {seed}: loss")
        assert_matches(direction, expected_direction, dtype, f"seed {seed}: direction")


def test_reptile_op_is_the_fused_adapt_mean():
    # The weights' update is bitwise what the fused adapt op gives, averaged in task order.
    pb = random_problem(11, torch.float64)
    adapted = ops.adapt(pb.params, pb.xs, pb.ys, pb.sizes, pb.inner_lr, pb.steps, pb.activation,
                        pb.loss, True)
    mean = adapted[0].clone()
    for t in range(1, adapted.shape[0]):
        mean += adapted[t]
    mean /= adapted.shape[0]
    assert torch.equal(ops.reptile(*reptile_args(pb))[1], pb.params - mean)


def test_reptile_op_names_a_bad_argument():
    pb = random_problem(1, torch.float32)
    with pytest.raises(ValueError, match="pymaml::reptile: x_query must be 3-D"):
        ops.reptile(pb.params, pb.xs, pb.ys, pb.xq[0], pb.yq, pb.sizes, pb.inner_lr, pb.steps,
                    pb.activation, pb.loss)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_train_reptile_fused_matches_the_reference(dtype):
    kw = dict(algorithm="reptile", iterations=60, meta_batch_size=3, dtype=dtype,
              progress=False, log_every=0)
    fused = pymaml.train(backend="fused", **kw)
    ref = pymaml.train(backend="reference", **kw)
    assert_matches(fused.model.params.detach(), ref.model.params.detach(), dtype, "weights")
    assert_matches(fused.losses, ref.losses, dtype, "losses")
