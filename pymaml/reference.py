"""The pure-autograd reference: MAML written the way the seed writes it (a Python loop over
tasks and inner steps, torch.autograd.grad with create_graph=True). It is the oracle every
fused result is checked against, so it stays simple and obviously right; it is also the
fallback backend (any device, dtype, depth, double backward, gradients to the data).

It serves every grad mode and torch.func transform (docs/training.md, "Grad modes and
torch.func"): the inner loop runs with autograd on whatever the caller's mode, the result
carries a graph only as a torch op's would, and under a transform the inner gradients are
taken with torch.func.grad. Arguments are those of pymaml.functional (validated there)."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch.nn import functional as F

from ._checks import wrapped_by_transform
from ._layout import unflatten

ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}


def cross_entropy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of the logits z [..., C], the mean over the points (every row of
    z; not over the ... x C entries as MSE and L1 average): F.cross_entropy with class
    probabilities y [..., C] (one-hot or soft), or with integer class indices y [...]."""
    C = z.shape[-1]
    return F.cross_entropy(z.reshape(-1, C), y.reshape(-1, C) if y.is_floating_point()
                           else y.reshape(-1))


LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "cross_entropy": cross_entropy}
# Under torch.func transforms: F.mse_loss's double backward fails under forward mode (jvp,
# jacfwd, hessian: "ZeroTensors are immutable", torch 2.13); the same mean written out does not.
_TRANSFORM_LOSSES = {"mse": lambda a, y: (a - y).square().mean(), "l1": F.l1_loss,
                     "cross_entropy": cross_entropy}


def net(weights: List[torch.Tensor], x: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP on x [K, n_in] with weights [W0, b0, W1, b1, ...]; linear output."""
    act = ACTIVATIONS[activation]
    depth = len(weights) // 2
    for l in range(depth):
        x = F.linear(x, weights[2 * l], weights[2 * l + 1])
        if l + 1 < depth:
            x = act(x)
    return x


def flat_net(params: torch.Tensor, x: torch.Tensor, sizes: Sequence[int],
             activation: str) -> torch.Tensor:
    """The MLP of the flat layout: params [P] on x [..., n_in], or per-task params [T, P] on
    x [T, N, n_in] (unchecked: pymaml.functional.mlp_forward checks)."""
    act = ACTIVATIONS[activation]
    layers = unflatten(params, sizes)
    h = x
    for l, (W, b) in enumerate(layers):
        # [T, N, in] @ [T, in, out] + [T, 1, out]  or  [..., in] @ [in, out] + [out]
        h = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2)) if params.dim() == 2 \
            else F.linear(h, W, b)
        if l + 1 < len(layers):
            h = act(h)
    return h


def inner_loop(weights, x, y, *, inner_lr, steps, activation, loss, first_order,
               functional=False, sizes=None, adapt_layers=None):
    """`steps` SGD steps on (x, y) [K, n] from `weights` (or x, y [steps, K, n]: a batch per
    step). Second order keeps the graph of every gradient (create_graph=True); first order
    treats the gradients as constants (the rates stay in the graph). functional=True takes
    the gradients with torch.func.grad (under torch.func transforms, where weights cannot be
    made autograd leaves).

    inner_lr is a number, or a tensor [steps, P] (row k: step k's rate of every parameter, in
    the flat layout of `sizes`). adapt_layers (None: all) lists the linear layers that move;
    the others keep their weights, and their rates are not read."""
    loss_fn = _losses(functional)[loss]
    per_step = x.dim() == 3  # x [steps, K, n_in]: step k trains on batch k
    inner_loss = lambda w, k: loss_fn(net(w, x[k] if per_step else x, activation),
                                      y[k] if per_step else y)
    moving = (range(len(weights)) if adapt_layers is None
              else [i for l in adapt_layers for i in (2 * l, 2 * l + 1)])
    for k in range(steps):
        if functional:
            grads = torch.func.grad(inner_loss)(weights, k)
            grads = [grads[i].detach() if first_order else grads[i] for i in moving]
        else:
            grads = torch.autograd.grad(inner_loss(weights, k), [weights[i] for i in moving],
                                        create_graph=not first_order)
        rates = ([r for layer in unflatten(inner_lr[k], sizes) for r in layer]
                 if isinstance(inner_lr, torch.Tensor) else None)
        weights = list(weights)
        for i, g in zip(moving, grads):
            weights[i] = weights[i] - (inner_lr if rates is None else rates[i]) * g
    return weights


def _forward_ad() -> bool:
    # A forward-mode AD level is open (torch.autograd.forward_ad.dual_level): tangents may flow.
    return torch.autograd.forward_ad._current_level >= 0


def _losses(functional: bool):
    # Under transforms and forward-mode AD, the losses whose double backward has a jvp.
    return _TRANSFORM_LOSSES if functional or _forward_ad() else LOSSES


def _tangent(t):
    # t's forward-mode tangent, or None.
    return torch.autograd.forward_ad.unpack_dual(t).tangent if _forward_ad() else None


def _result(out: torch.Tensor, keep_graph: bool) -> torch.Tensor:
    # The result with the caller's graph or without, its forward-mode tangent kept either way.
    if keep_graph:
        return out
    tangent = _tangent(out)
    if tangent is None:
        return out.detach()
    return torch.autograd.forward_ad.make_dual(out.detach(), tangent.detach())


class autograd_on:
    """Autograd on, whatever the caller's mode: torch.no_grad and torch.inference_mode both
    turn it off, and enable_grad alone does not leave inference mode. (A class, not a
    generator: the reference enters it once per call.)"""

    def __enter__(self):
        self._modes = [torch.enable_grad()]
        if torch.is_inference_mode_enabled():
            self._modes.insert(0, torch.inference_mode(False))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False


def _usable(t: torch.Tensor) -> torch.Tensor:
    # Tensors made under torch.inference_mode cannot be saved for backward: a normal copy.
    return t.clone() if t.is_inference() else t


def _weights(params: torch.Tensor, sizes: Sequence[int], functional: bool) -> List[torch.Tensor]:
    # The inner loop needs a graph even when the caller's params do not require grad (not
    # under a transform: torch.func.grad makes its own).
    params = _usable(params)
    if not functional and not params.requires_grad:
        tangent = _tangent(params)  # a forward-mode tangent goes on with the copy
        params = params.detach().requires_grad_()
        if tangent is not None:
            params = torch.autograd.forward_ad.make_dual(params, tangent)
    return [t for layer in unflatten(params, sizes) for t in layer]


def _keeps_graph(tensors, functional: bool) -> bool:
    # Whether the caller's autograd graph should reach the result (as any torch op would).
    # Under a transform requires_grad reads False even where autograd records (vmap over
    # params that require grad), and torch.func.grad made no leaves: the graph is the
    # caller's alone, so only the caller's grad mode decides.
    return torch.is_grad_enabled() and (functional or any(t.requires_grad for t in tensors))


def over_tasks(params, sizes, tensors, data, task, shared, finish=torch.stack):
    """The frame of a reference call, MAML's here and DAML's (pymaml.daml): with autograd on,
    task(weights, functional, *shared(), *task t's slices of data) for every task t, the
    results stacked (or `finish`ed). Returns (that, whether the caller's graph should reach
    it). tensors: every tensor of the call (a transform may wrap them; their requires_grad
    counts); shared: what the tasks share beyond the weights, made with autograd on."""
    functional = wrapped_by_transform(tensors)
    keep_graph = _keeps_graph(tensors, functional)
    with autograd_on():
        weights = _weights(params, sizes, functional)
        common = shared()
        data = [_usable(t) for t in data]
        out = finish([task(weights, functional, *common, *(t[i] for t in data))
                      for i in range(data[0].shape[0])])
    return out, keep_graph


def rate_tensors(inner_lr):
    # The rates, where they are a tensor (their gradient is asked for like params').
    return (inner_lr,) if isinstance(inner_lr, torch.Tensor) else ()


def _usable_rates(inner_lr):
    # Rates made under torch.inference_mode (or from such a tensor) as a normal tensor.
    return (_usable(inner_lr) if isinstance(inner_lr, torch.Tensor) else inner_lr,)


def adapt(params, x_support, y_support, *, sizes, inner_lr, steps, activation="relu",
          loss="mse", first_order=False, adapt_layers=None):
    """[T, P]: the adapted parameters of every task."""
    def task(weights, functional, rates, x, y):
        w = inner_loop(weights, x, y, inner_lr=rates, steps=steps, activation=activation,
                       loss=loss, first_order=first_order, functional=functional, sizes=sizes,
                       adapt_layers=adapt_layers)
        return torch.cat([p.reshape(-1) for p in w])

    data = (x_support, y_support)
    return _result(*over_tasks(params, sizes, (params, *data, *rate_tensors(inner_lr)), data,
                               task, lambda: _usable_rates(inner_lr)))


def maml_loss(params, x_support, y_support, x_query, y_query, *, sizes, inner_lr, steps,
              activation="relu", loss="mse", first_order=False, adapt_layers=None):
    """Scalar: the mean over tasks of the query loss after adaptation."""
    def task(weights, functional, rates, xs, ys, xq, yq):
        w = inner_loop(weights, xs, ys, inner_lr=rates, steps=steps, activation=activation,
                       loss=loss, first_order=first_order, functional=functional, sizes=sizes,
                       adapt_layers=adapt_layers)
        return _losses(functional)[loss](net(w, xq, activation), yq)

    data = (x_support, y_support, x_query, y_query)
    return _result(*over_tasks(params, sizes, (params, *data, *rate_tensors(inner_lr)), data,
                               task, lambda: _usable_rates(inner_lr),
                               lambda losses: torch.stack(losses).mean()))
