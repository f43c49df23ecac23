"""pymaml's public functional API: MAML on plain tensors.

Parameters are one flat tensor in the order [W0, b0, W1, b1, ...] (W_l in nn.Linear's
[out, in] layout) with the layer sizes [n_in, hidden..., n_out]; a meta-batch of T tasks is
x [T, K, n_in], y [T, K, n_out]. Every function checks its arguments (ValueError / TypeError
naming the argument) and runs on one of two backends:

- "fused": the compiled op (torch.ops.pymaml.*): the whole inner loop and the exact
  meta-gradient of every task in one call, no autograd graph; gradients flow to params;
- "reference": the pure-autograd oracle (pymaml.reference);
- "auto": fused when it can serve the call, the reference otherwise.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _checks, _ops, _rates, _route
from . import reference as _reference
from ._checks import ACTIVATIONS, BACKENDS, LOSSES  # noqa: F401 (pymaml.functional's names)
from ._layout import num_params, unflatten
from .daml import daml_adapt, daml_loss  # noqa: F401 (DAML's functional API: pymaml/daml.py)
from ._rates import per_layer_rates  # noqa: F401 (pymaml.functional's name)

__all__ = ["init_params", "mlp_forward", "adapt", "maml_loss", "num_params", "per_layer_rates",
           "daml_loss", "daml_adapt"]

def _direct_rule(params, inner_lr, adapt_layers, sizes, steps):
    """For a call with learned rates or adapt_layers that may go straight to the ops with
    rates (as _direct says for the rest): (rates [R, P], layers, None for every
    layer); None otherwise. The op checks the rest (finite rates, layer range, duplicates) and
    any error it raises sends the call down the checked path."""
    if type(adapt_layers) not in (list, tuple, type(None)):
        return None
    if adapt_layers is not None and not all(type(l) is int for l in adapt_layers):
        return None
    if isinstance(inner_lr, torch.Tensor):
        if (inner_lr.dtype != params.dtype or inner_lr.device.type != "cpu"
                or params.device.type != "cpu" or _route.under_torch_func((inner_lr,))):
            return None
    elif params.device.type != "cpu":
        return None
    try:
        P = num_params(sizes)
        rates = _rates.rate_rows(inner_lr, params, steps, P)
    except RuntimeError:  # a shape that does not broadcast: the checked path says so
        return None
    return rates, None if adapt_layers is None else list(adapt_layers)


def _choose_backend(backend, params, sizes, steps, data, rule=False, rates=None) -> str:
    """rule: the call has learned rates or frozen layers (rates and adapt_layers, CPU only)."""
    cpu_only = ("tensor rates and adapt_layers run" if rule else
                "a support batch per inner step runs" if data and data[0].dim() == 4 else None)
    return _route.choose(backend, params, (("sizes", sizes),), steps, data, cpu_only,
                         extra=() if rates is None else (rates,))


# ---- public API -----------------------------------------------------------------------------

def init_params(sizes, *, generator: Optional[torch.Generator] = None,
                dtype: torch.dtype = torch.float32, device=None,
                zero_bias: bool = False) -> torch.Tensor:
    """A flat [P] parameter vector with nn.Linear's default initialisation: W and b uniform in
    ±1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5) for W). zero_bias=True gives the seed's
    initialisation instead: the same W, biases zero."""
    sizes = _checks.check_sizes(sizes)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    params = torch.empty(num_params(sizes), dtype=dtype, device=device)
    for W, b in unflatten(params, sizes):
        bound = 1.0 / math.sqrt(W.shape[1])
        with torch.no_grad():
            W.uniform_(-bound, bound, generator=generator)
            if zero_bias:
                b.zero_()
            else:
                b.uniform_(-bound, bound, generator=generator)
    return params


def mlp_forward(params: torch.Tensor, x: torch.Tensor, *, sizes, activation: str = "relu") -> torch.Tensor:
    """The MLP's output. params [P] with x [..., n_in] gives [..., n_out]; per-task params
    [T, P] with x [T, N, n_in] gives [T, N, n_out]. Differentiable (plain torch ops)."""
    sizes = _checks.check_sizes(sizes)
    _checks.check_params(params, sizes, allow_batched=True)
    _checks.check_choice("activation", activation, ACTIVATIONS)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != params.dtype or x.device != params.device:
        raise TypeError(f"x must have the dtype and device of params ({params.dtype}, "
                        f"{params.device}), got ({x.dtype}, {x.device})")
    batched = params.dim() == 2
    if x.dim() < 1 or x.shape[-1] != sizes[0] or (batched and (x.dim() != 3 or x.shape[0] != params.shape[0])):
        want = f"[{params.shape[0]}, N, {sizes[0]}]" if batched else f"[..., {sizes[0]}]"
        raise ValueError(f"x must be {want}, got shape {list(x.shape)}")
    return _reference.flat_net(params, x, sizes, activation)


def adapt(params, x_support, y_support, *, sizes, inner_lr, steps, activation="relu",
          loss="mse", first_order=False, adapt_layers=None, backend="auto") -> torch.Tensor:
    """[T, P]: every task's parameters after `steps` SGD steps with rate `inner_lr` on its
    support set, starting from params [P]. Differentiable in params (second order, or with each
    step's Jacobian taken as the identity when first_order=True). The support set is
    x_support [T, K, n_in], y_support [T, K, n_out] for every step, or [T, steps, K, ...]: a
    batch of its own per inner step (CPU or reference backend).

    inner_lr: a number, or a tensor broadcastable to [steps, P] (a rate per step and per
    parameter: [] , [P] as Meta-SGD, [steps, 1], [steps, P]; per_layer_rates expands MAML++'s
    per-layer rates); a tensor that requires grad gets its gradient too. adapt_layers: None
    (every layer adapts) or the indices of the linear layers that move ([-1]: ANIL's head);
    the others keep their weights (CPU or reference backend)."""
    return _run("adapt", params, (x_support, y_support), sizes, inner_lr, steps, activation,
                loss, first_order, adapt_layers, backend)


def maml_loss(params, x_support, y_support, x_query, y_query, *, sizes, inner_lr, steps,
              activation="relu", loss="mse", first_order=False, adapt_layers=None,
              backend="auto") -> torch.Tensor:
    """Scalar: the mean over the T tasks of the query loss after adapting on the support set
    (as in adapt: [T, K, ...], or a batch per inner step [T, steps, K, ...]). `.backward()`
    leaves the meta-gradient (MAML, or FO-MAML with first_order=True) in params.grad, ready
    for any torch.optim optimizer, and in inner_lr.grad when inner_lr is a tensor that
    requires grad (learned rates, as adapt describes them; adapt_layers likewise)."""
    return _run("maml_loss", params, (x_support, y_support, x_query, y_query), sizes,
                inner_lr, steps, activation, loss, first_order, adapt_layers, backend)


_DATA_NAMES = ("x_support", "y_support", "x_query", "y_query")


def _run(op, params, data, sizes, inner_lr, steps, activation, loss, first_order,
         adapt_layers, backend):
    """adapt or maml_loss (`op`): straight to the fused op when the call may go there, else
    through the checks to the backend that serves it."""
    if loss == "cross_entropy":
        data = _class_targets(params, data, sizes)
    rule = adapt_layers is not None or isinstance(inner_lr, torch.Tensor)
    if ((first_order is True or first_order is False)
            and _route.direct(backend, params, data, 0.0 if rule else inner_lr, steps, (sizes,),
                              (activation, loss), ("cpu", "cuda"))):
        try:
            if not rule:
                return _fused(op, params, data, sizes, inner_lr, steps, activation, loss,
                              first_order)
            direct = _direct_rule(params, inner_lr, adapt_layers, sizes, steps)
            if direct is not None:
                return _fused(op, params, data, sizes, 0.0, steps, activation, loss,
                              first_order, *direct)
        except (RuntimeError, TypeError, ValueError):
            pass  # the checked path below words the error, or serves the call otherwise
    sizes = _checks.check_sizes(sizes)
    _checks.check_params(params, sizes)
    number = 0.0 if isinstance(inner_lr, torch.Tensor) else inner_lr
    _checks.check_hyper(number, steps, activation, loss, first_order, params.dtype)
    rates = _checks.check_rates(inner_lr, params, sizes, steps)
    layers = _checks.check_adapt_layers(adapt_layers, sizes)
    _checks.check_data(params, sizes, steps, **dict(zip(_DATA_NAMES, data)))
    rule = rates is not None or layers is not None
    which = _choose_backend(backend, params, sizes, steps, data, rule, rates)
    P = num_params(sizes)
    if which == "reference":
        return getattr(_reference, op)(params, *data, sizes=sizes,
                                       inner_lr=_rates.reference_rates(inner_lr, steps, P),
                                       steps=steps, activation=activation, loss=loss,
                                       first_order=first_order, adapt_layers=layers)
    if rule:
        return _fused(op, params, data, sizes, 0.0, int(steps), activation, loss, first_order,
                      _rates.rate_rows(inner_lr, params, steps, P), layers)
    return _fused(op, params, data, sizes, float(inner_lr), int(steps), activation, loss,
                  first_order)


def _class_targets(params, data, sizes):
    """data with cross-entropy's integer class labels (y_support [T, K] or [T, steps, K],
    y_query [T, Q]) as one-hot class probabilities of params' dtype, what every backend takes
    (_checks.class_targets checks them); class probabilities go on as they are."""
    sizes = _checks.check_sizes(sizes)
    for name, y in zip(_DATA_NAMES[1::2], data[1::2]):
        _checks.check_probabilities(name, y, sizes[-1])
    if not any(isinstance(y, torch.Tensor) and not y.is_floating_point() for y in data[1::2]):
        return data
    _checks.check_params(params, sizes)
    xs = data[0]
    per_step = isinstance(xs, torch.Tensor) and xs.dim() == 4  # then y_support [T, steps, K]
    return tuple(_checks.class_targets(name, t, sizes[-1], params,
                                       (3,) if name == "y_support" and per_step else (2,))
                 if name.startswith("y") else t for name, t in zip(_DATA_NAMES, data))


def _fused(op, params, data, sizes, rate, steps, activation, loss, first_order, rates=None,
           layers=None):
    """The fused op; rates [R, P] and layers only for learned rates or frozen layers (the
    scalar-rate call keeps the op's scalar kernel)."""
    args = (params, *data, sizes, rate, steps, activation, loss, first_order)
    rule = rates is not None or layers is not None
    if op == "adapt":
        return _ops.ops.adapt(*args, rates, layers) if rule else _ops.ops.adapt(*args)
    grad_mode = torch.is_grad_enabled()
    need_rate_grad = grad_mode and rates is not None and rates.requires_grad
    need_grad = need_rate_grad or (grad_mode and params.requires_grad)
    if not rule:  # the value form (keep_grad): the loss alone
        return _ops.ops.maml_loss(*args, need_grad, True)[0]
    return _ops.ops.maml_loss(*args, need_grad, True, rates, layers, need_rate_grad)[0]
