"""One meta-iteration's gradient, what pymaml.train hands its outer optimizer, per algorithm
and backend: MAML's and FO-MAML's meta-gradient, or Reptile's direction params - mean adapted
params (its inner loop trains on support and query together). The trainer's per-iteration
path calls `for_run`'s function once an iteration; the fast path (fast_path.py) cuts the inner
loop's data with the same `inner_data`, so both paths train on the same points."""

from __future__ import annotations

from typing import Callable, Tuple

import torch

from . import _ops
from . import functional as F
from . import reference as _reference
from . import tasks as _tasks
from .config import RunConfig


def inner_data(config: RunConfig, xs, ys, xq, yq) -> Tuple[torch.Tensor, torch.Tensor]:
    """The points the inner loop of `config`'s algorithm trains on, [..., N, features]: the
    support set (Reptile: support and query), whole for every step, or cut into a minibatch
    per step ([..., steps, inner_batch, features]) when inner_batch is set."""
    if config.algorithm == "reptile":
        xs, ys = torch.cat([xs, xq], dim=-2), torch.cat([ys, yq], dim=-2)
    if config.inner_batch is None:
        return xs, ys
    return tuple(_tasks.per_step_batches(t, config.inner_steps, config.inner_batch)
                 for t in (xs, ys))


def for_run(config: RunConfig, backend: str) -> Callable:
    """fn(params [P] detached, TaskBatch) -> (meta-loss 0-d, gradient [P] for the optimizer).
    The arguments were checked once; the fused backend calls the op directly (no autograd
    wrapper, no per-call Python checks beyond the op's own)."""
    c, sizes = config, list(config.sizes)
    hyper = dict(sizes=sizes, inner_lr=c.inner_lr, steps=c.inner_steps,
                 activation=c.activation, loss=c.loss)
    fused_args = (sizes, c.inner_lr, c.inner_steps, c.activation, c.loss)
    first_order = c.algorithm == "fomaml"
    loss_fn = _reference.LOSSES[c.loss]

    def step(params, batch):
        xq, yq = batch.x_query, batch.y_query
        x, y = inner_data(c, *batch)
        if backend == "fused" and c.algorithm == "reptile":
            return _ops.ops.reptile(params, x, y, xq, yq, *fused_args)
        if backend == "fused":
            return _ops.ops.maml_loss(params, x, y, xq, yq, *fused_args, first_order, True)
        if c.algorithm == "reptile":
            with torch.no_grad():
                adapted = _reference.adapt(params, x, y, first_order=True, **hyper)
                predicted = F.mlp_forward(adapted, xq, sizes=sizes, activation=c.activation)
                return loss_fn(predicted, yq), params - adapted.mean(0)
        params = params.requires_grad_()
        value = _reference.maml_loss(params, x, y, xq, yq, first_order=first_order, **hyper)
        (grad,) = torch.autograd.grad(value, params)
        return value.detach(), grad
    return step
