"""pymaml.functional's direct route to the fused op (arguments checked in C++) serves only what
the checked path would serve the same way: arguments the torch dispatcher would convert (a
tensor or bool for a number, bytes for a string) and devices without kernels take the checked
path and its errors, whatever the backend. And the ops' C++ autograd edges: reptile's outputs
are not differentiable, train_chunk refuses tracked params and bumps version counters, adapt
differentiates with data made under torch.inference_mode."""

import pytest
import torch

from pymaml import functional as F

from conftest import random_problem, requires_fused

pytestmark = requires_fused
ops = torch.ops.pymaml
BACKENDS = ["auto", "fused", "reference"]


def problem():
    pb = random_problem(3, torch.float64)
    pb.steps, pb.first_order = max(pb.steps, 1), False  # a backward that reads saved params
    return pb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change,error,match", [
    # a float tensor is a learned rate now (tests/test_learned_rates.py); an integer one is not
    (dict(inner_lr=torch.tensor(1)), TypeError, "inner_lr must have the dtype of params"),
    (dict(steps=torch.tensor(2)), TypeError, "steps must be an int"),
    (dict(activation=b"relu"), ValueError, "activation must be one of"),
    (dict(sizes="1,8,1"), (TypeError, ValueError), "sizes"),
], ids=["tensor-lr", "tensor-steps", "bytes-activation", "str-sizes"])
def test_converted_arguments_get_the_checked_paths_error(backend, change, error, match):
    pb = problem()
    hyper = dict(pb.hyper, **change)
    with pytest.raises(error, match=match):
        F.maml_loss(pb.params.clone().requires_grad_(), *pb.data, backend=backend, **hyper)
    with pytest.raises(error, match=match):
        F.adapt(pb.params, pb.xs, pb.ys, backend=backend, **hyper)


def test_the_meta_device_is_refused_by_the_fused_backend():
    pb = problem()
    meta = [t.to("meta") for t in (pb.params, *pb.data)]
    with pytest.raises(RuntimeError, match="no kernels for device type 'meta'"):
        F.maml_loss(*meta, backend="fused", **pb.hyper)


def test_reptile_outputs_are_not_differentiable():
    pb = problem()
    p = pb.params.clone().requires_grad_()
    value, direction = ops.reptile(p, *pb.data, pb.sizes, pb.inner_lr, pb.steps, pb.activation,
                                   pb.loss)
    assert not value.requires_grad and not direction.requires_grad


def test_train_chunk_refuses_tracked_params_and_bumps_versions():
    pb = problem()
    chunk = [t.unsqueeze(0) for t in pb.data]
    args = (pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss, "maml", "sgd",
            [1e-2, 0.9, 0.0, 0.0, 0.0, 0.0])
    tracked = pb.params.clone().requires_grad_()
    with pytest.raises(ValueError, match="must not require grad"):
        ops.train_chunk(tracked, [torch.zeros_like(tracked)], *chunk, *args)
    # a graph that saved the weights before the in-place update cannot use them after it
    adapted = F.adapt(tracked, pb.xs, pb.ys, **pb.hyper)
    buffer = torch.zeros_like(tracked)
    before = tracked._version, buffer._version
    ops.train_chunk(tracked.detach(), [buffer], *chunk, *args)
    assert tracked._version > before[0] and buffer._version > before[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        adapted.sum().backward()


def test_adapt_differentiates_data_made_in_inference_mode():
    pb = problem()
    with torch.inference_mode():
        xs, ys = pb.xs.clone(), pb.ys.clone()
    p = pb.params.clone().requires_grad_()
    F.adapt(p, xs, ys, **pb.hyper).sum().backward()
    q = pb.params.clone().requires_grad_()
    F.adapt(q, pb.xs, pb.ys, **pb.hyper).sum().backward()
    assert torch.equal(p.grad, q.grad)
