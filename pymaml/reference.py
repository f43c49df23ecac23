"""The pure-autograd reference: MAML written the way the seed writes it (a Python loop over
tasks and inner steps, torch.autograd.grad with create_graph=True). It is the oracle every
fused result is checked against, so it stays simple and obviously right; it is also the
fallback backend (any device, dtype, depth, double backward, gradients to the data).

Arguments are those of pymaml.functional (already validated there)."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch.nn import functional as F

from ._layout import unflatten

ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}
LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}


def net(weights: List[torch.Tensor], x: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP on x [K, n_in] with weights [W0, b0, W1, b1, ...]; linear output."""
    act = ACTIVATIONS[activation]
    depth = len(weights) // 2
    for l in range(depth):
        x = F.linear(x, weights[2 * l], weights[2 * l + 1])
        if l + 1 < depth:
            x = act(x)
    return x


def inner_loop(weights, x, y, *, inner_lr, steps, activation, loss, first_order):
    """`steps` SGD steps on (x, y) from `weights`. Second order keeps the graph of every
    gradient (create_graph=True); first order treats the gradients as constants."""
    loss_fn = LOSSES[loss]
    for _ in range(steps):
        inner = loss_fn(net(weights, x, activation), y)
        grads = torch.autograd.grad(inner, weights, create_graph=not first_order)
        weights = [w - inner_lr * g for w, g in zip(weights, grads)]
    return weights


def _leaf_weights(params: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
    # The inner loop needs a graph even when the caller's params do not require grad.
    if not params.requires_grad:
        params = params.detach().requires_grad_()
    return [t for layer in unflatten(params, sizes) for t in layer]


def _keeps_graph(*tensors) -> bool:
    # Whether the caller's autograd graph should reach the result (as any torch op would).
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def adapt(params, x_support, y_support, *, sizes, inner_lr, steps, activation="relu",
          loss="mse", first_order=False):
    """[T, P]: the adapted parameters of every task."""
    keep_graph = _keeps_graph(params, x_support, y_support)
    with torch.enable_grad():
        weights = _leaf_weights(params, sizes)
        adapted = []
        for t in range(x_support.shape[0]):
            w = inner_loop(weights, x_support[t], y_support[t], inner_lr=inner_lr, steps=steps,
                           activation=activation, loss=loss, first_order=first_order)
            adapted.append(torch.cat([p.reshape(-1) for p in w]))
        out = torch.stack(adapted)
    return out if keep_graph else out.detach()


def maml_loss(params, x_support, y_support, x_query, y_query, *, sizes, inner_lr, steps,
              activation="relu", loss="mse", first_order=False):
    """Scalar: the mean over tasks of the query loss after adaptation."""
    keep_graph = _keeps_graph(params, x_support, y_support, x_query, y_query)
    loss_fn = LOSSES[loss]
    with torch.enable_grad():
        weights = _leaf_weights(params, sizes)
        losses = []
        for t in range(x_support.shape[0]):
            w = inner_loop(weights, x_support[t], y_support[t], inner_lr=inner_lr, steps=steps,
                           activation=activation, loss=loss, first_order=first_order)
            losses.append(loss_fn(net(w, x_query[t], activation), y_query[t]))
        out = torch.stack(losses).mean()
    return out if keep_graph else out.detach()
