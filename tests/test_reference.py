"""The oracle itself, checked against an independent formulation: torch.func (grad + vmap)."""

import pytest
import torch
from torch.func import grad_and_value

from pymaml import reference
from pymaml.testing import torch_func_maml
from pymaml._layout import unflatten

from conftest import random_problem


def func_maml(pb):
    """(mean query loss, meta-gradient, adapted params) the torch.func way."""
    meta_loss, adapt = torch_func_maml(**pb.hyper)
    grad, loss = grad_and_value(meta_loss)(pb.params, *pb.data)
    return loss, grad, adapt(pb.params, pb.xs, pb.ys)


@pytest.mark.parametrize("seed", range(12))
def test_reference_matches_torch_func(seed):
    pb = random_problem(seed, torch.float64)
    p = pb.params.clone().requires_grad_()
    loss = reference.maml_loss(p, *pb.data, **pb.hyper)
    loss.backward()
    adapted = reference.adapt(pb.params, pb.xs, pb.ys, **pb.hyper)
    f_loss, f_grad, f_adapted = func_maml(pb)
    torch.testing.assert_close(loss.detach(), f_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.grad, f_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(adapted, f_adapted, rtol=1e-12, atol=1e-12)


def test_reference_first_order_is_query_gradient_at_adapted_params():
    pb = random_problem(5, torch.float64)
    pb.first_order, pb.steps = True, 3
    p = pb.params.clone().requires_grad_()
    reference.maml_loss(p, *pb.data, **pb.hyper).backward()
    adapted = reference.adapt(pb.params, pb.xs, pb.ys, **pb.hyper).detach().requires_grad_()
    per_task = torch.stack([
        reference.LOSSES[pb.loss](reference.net([t for l in unflatten(adapted[i], pb.sizes) for t in l],
                                                pb.xq[i], pb.activation), pb.yq[i])
        for i in range(adapted.shape[0])])
    (g,) = torch.autograd.grad(per_task.mean(), adapted)
    torch.testing.assert_close(p.grad, g.sum(0), rtol=1e-12, atol=1e-14)
