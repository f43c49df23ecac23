"""The oracle itself, checked against an independent formulation: torch.func (grad + vmap)."""

import pytest
import torch
from torch.func import grad, vmap

from pymaml import reference
from pymaml._layout import unflatten

from conftest import random_problem

LOSS_FNS = {"mse": torch.nn.functional.mse_loss, "l1": torch.nn.functional.l1_loss}


def func_maml(pb):
    """(mean query loss, meta-gradient, adapted params) the torch.func way: functional grads
    of a flat-parameter network, vmapped over tasks."""
    act = reference.ACTIVATIONS[pb.activation]
    loss_fn = LOSS_FNS[pb.loss]

    def net(flat, x):
        layers = unflatten(flat, pb.sizes)
        for l, (W, b) in enumerate(layers):
            x = x @ W.T + b
            if l + 1 < len(layers):
                x = act(x)
        return x

    def task_loss(flat, x, y):
        return loss_fn(net(flat, x), y)

    def inner(flat, xs, ys):
        for _ in range(pb.steps):
            g = grad(task_loss)(flat, xs, ys)
            flat = flat - pb.inner_lr * (g.detach() if pb.first_order else g)
        return flat

    def query_loss(flat, xs, ys, xq, yq):
        return task_loss(inner(flat, xs, ys), xq, yq)

    losses = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(pb.params, *pb.data)
    grads = vmap(grad(query_loss), in_dims=(None, 0, 0, 0, 0))(pb.params, *pb.data)
    adapted = vmap(inner, in_dims=(None, 0, 0))(pb.params, pb.xs, pb.ys)
    return losses.mean(), grads.mean(0), adapted


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
