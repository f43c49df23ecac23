"""One meta-iteration's gradient, what pymaml.train hands its outer optimizer, per algorithm
and backend: MAML's and FO-MAML's meta-gradient (with the learned inner rates' gradient
beside it, for Meta-SGD and the other learned-rate modes), or Reptile's direction params -
mean adapted params (its inner loop trains on support and query together). The trainer's
per-iteration path calls `for_run`'s function once an iteration; the fast path (fast_path.py)
cuts the inner loop's data with the same `inner_data`, so both paths train on the same
points."""

from __future__ import annotations

from typing import Callable, Tuple

import torch

from . import _checks, _ops, _rates
from . import functional as F
from . import reference as _reference
from . import tasks as _tasks


def class_targets(config, batch):
    """`batch` (a TaskBatch or DAMLBatch: one meta-batch, or a chunk's many) with its integer
    class labels (y fields [..., points], loss="cross_entropy") as one-hot class probabilities
    [..., points, n_out] of the inputs' dtype: what the ops and every step take. Applied once
    where a batch is drawn, before inner_data cuts or joins its points."""
    if config.loss != "cross_entropy":
        return batch
    n_out, like = config.sizes[-1], batch.x_query
    return batch._replace(**{f: _checks.class_targets(f, getattr(batch, f), n_out, like, None)
                             for f in batch._fields if f[0] == "y"})


def inner_data(config, reptile: bool, xs, ys, xq, yq) -> Tuple[torch.Tensor, torch.Tensor]:
    """The points the inner loop of `config`'s algorithm trains on, [..., N, features]: the
    support set (Reptile: support and query), whole for every step, or cut into a minibatch
    per step ([..., steps, inner_batch, features]) when inner_batch is set."""
    if reptile:
        xs, ys = torch.cat([xs, xq], dim=-2), torch.cat([ys, yq], dim=-2)
    if config.inner_batch is None:
        return xs, ys
    return tuple(_tasks.per_step_batches(t, config.inner_steps, config.inner_batch)
                 for t in (xs, ys))


def for_run(config, backend: str, algorithm) -> Callable:
    """fn(weights, TaskBatch) -> (meta-loss 0-d, [gradient of each weight] for the optimizer),
    where weights are [params [P]] or, for a run that learns its inner rates, [params,
    rates] (detached). The arguments were checked once; a plain run's fused backend calls
    the op directly (no autograd wrapper, no per-call Python checks beyond the op's own)."""
    reptile = algorithm.reptile_update
    if not config.plain:
        return _general_step(config, backend, algorithm)
    c, sizes = config, list(config.sizes)
    hyper = dict(sizes=sizes, inner_lr=c.inner_lr, steps=c.inner_steps,
                 activation=c.activation, loss=c.loss)
    fused_args = (sizes, c.inner_lr, c.inner_steps, c.activation, c.loss)
    first_order = algorithm.first_order
    loss_fn = _reference.LOSSES[c.loss]

    def step(weights, batch):
        (params,) = weights
        xq, yq = batch.x_query, batch.y_query
        x, y = inner_data(c, reptile, *batch)
        if backend == "fused" and reptile:
            value, direction = _ops.ops.reptile(params, x, y, xq, yq, *fused_args)
            return value, [direction]
        if backend == "fused":
            value, grad = _ops.ops.maml_loss(params, x, y, xq, yq, *fused_args, first_order,
                                             True)
            return value, [grad]
        if reptile:
            with torch.no_grad():
                adapted = _reference.adapt(params, x, y, first_order=True, **hyper)
                predicted = F.mlp_forward(adapted, xq, sizes=sizes, activation=c.activation)
                return loss_fn(predicted, yq), [params - adapted.mean(0)]
        params = params.requires_grad_()
        value = _reference.maml_loss(params, x, y, xq, yq, first_order=first_order, **hyper)
        return value.detach(), list(torch.autograd.grad(value, params))
    return step


def _general_step(config, backend: str, algorithm) -> Callable:
    """for_run's function for a run with learned rates or frozen layers: through the public
    functional API (the raw ops take one fixed rate and adapt every layer), on `backend`.
    The rates' gradient is the functional API's, exact like the weights'."""
    c, sizes = config, list(config.sizes)
    hyper = dict(sizes=sizes, steps=c.inner_steps, activation=c.activation, loss=c.loss,
                 adapt_layers=None if c.adapt_layers is None else list(c.adapt_layers),
                 backend=backend)
    loss_fn = _reference.LOSSES[c.loss]
    reptile = algorithm.reptile_update

    def step(weights, batch):
        xq, yq = batch.x_query, batch.y_query
        x, y = inner_data(c, reptile, *batch)
        if reptile:  # its inner loop moves the adapted layers only
            (params,) = weights
            with torch.no_grad():
                adapted = F.adapt(params, x, y, inner_lr=c.inner_lr, first_order=True,
                                  **hyper)
                predicted = F.mlp_forward(adapted, xq, sizes=sizes, activation=c.activation)
                return loss_fn(predicted, yq), [params - adapted.mean(0)]
        weights = [w.requires_grad_() for w in weights]
        rate = c.inner_lr if len(weights) == 1 else \
            _rates.for_steps(weights[1], c.learn_inner_lr, sizes, c.inner_steps)
        value = F.maml_loss(weights[0], x, y, xq, yq, inner_lr=rate,
                            first_order=algorithm.first_order, **hyper)
        return value.detach(), list(torch.autograd.grad(value, weights))
    return step
