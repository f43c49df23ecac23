"""DAML (Yu, Finn et al., 2018; docs/design.md §8.3): MAML with a learned inner loss on
unlabeled inputs. A loss MLP reads, at every unlabeled source point, the base network's output
and hidden activations ("taps"); the inner loop takes SGD steps on the mean |h| or h^2 of its
outputs; the outer loss is the supervised loss on labeled query data.

The public API, `daml_loss` and `daml_adapt`, is checked, then routed as pymaml.functional's
calls are; `reference_loss` and `reference_adapt` are its pure-autograd reference."""

from __future__ import annotations

from typing import List

import torch

from . import _checks, _ops, _rates, _route
from . import reference as _reference
from ._checks import ADAPT_LOSSES, loss_input_width  # noqa: F401 (pymaml.daml's names)
from ._layout import num_params, unflatten

__all__ = ["daml_loss", "daml_adapt", "reference_loss", "reference_adapt", "loss_input_width",
           "fused_available", "ADAPT_LOSSES"]

fused_available = _ops.available  # the fused DAML ops are in every build of pymaml._C


# ---- argument checks ------------------------------------------------------------------------

def _check_call(params, loss_params, sizes, loss_sizes, inner_lr, steps, activation, loss,
                adapt_loss, first_order):
    """The checks common to daml_loss and daml_adapt; returns (sizes, loss_sizes)."""
    sizes, loss_sizes = _checks.check_daml_sizes(sizes, loss_sizes)
    _checks.check_params(params, sizes)
    _checks.check_flat("loss_params", loss_params, loss_sizes, "loss_sizes", params.dtype, params.device)
    number = 0.0 if isinstance(inner_lr, torch.Tensor) else inner_lr
    _checks.check_hyper(number, steps, activation, loss, first_order, params.dtype)
    _checks.check_rates(inner_lr, params, sizes, steps)
    _checks.check_choice("adapt_loss", adapt_loss, ADAPT_LOSSES)
    if first_order:
        raise ValueError("first_order=True is not supported by DAML: the loss network's "
                         "parameters (loss_params, psi) reach the outer loss only through the "
                         "second-order terms of the inner steps, so with first order they "
                         "would get no gradient; use first_order=False")
    if steps < 1:
        raise ValueError(f"steps must be >= 1 for DAML: with no inner step the loss network "
                         f"is never used and loss_params (psi) would get no gradient; got {steps}")
    return sizes, loss_sizes


def _direct(backend, params, loss_params, data, sizes, loss_sizes, inner_lr, steps,
            strings, first_order=False) -> bool:
    """Whether a DAML call may go straight to the fused op (_route.direct); DAML's own
    refusals (first order, steps < 1) take the checked path, which words them."""
    return (first_order is False and type(steps) is int and steps >= 1
            and isinstance(loss_params, torch.Tensor)
            and _route.direct(backend, params, data, inner_lr, steps, (sizes, loss_sizes),
                              strings, ("cpu",))
            and not _route.under_torch_func((loss_params,)))


def _choose_backend(backend, params, sizes, loss_sizes, steps, data, refusal=None,
                    extra=()) -> str:
    """extra: loss_params and learned rates, which a torch.func transform or forward-mode AD
    may carry as well as params and the data."""
    return _route.choose(backend, params, (("sizes", sizes), ("loss_sizes", loss_sizes)),
                         steps, data, "the fused DAML ops run", refusal,
                         tuple(t for t in extra if isinstance(t, torch.Tensor)))


# ---- public API -----------------------------------------------------------------------------

def daml_loss(params, loss_params, x_source, x_query, y_query, *, sizes, loss_sizes, inner_lr,
              steps, activation="relu", loss="l1", adapt_loss="l1", first_order=False,
              backend="auto") -> torch.Tensor:
    """Scalar: the mean over the T tasks of the query loss (`loss`, "l1", "mse" or
    "cross_entropy", whose y_query may be int64 class indices [T, Q]) of the base network
    after `steps` SGD steps (rate `inner_lr`) on the learned inner loss over the unlabeled
    source inputs x_source ([T, K_s, n_in], or [T, steps, K_s, n_in]: a batch per step).
    `.backward()` leaves the meta-gradient in params.grad and loss_params.grad.

    params [P] (base MLP, `sizes`), loss_params [P_psi] (loss MLP, `loss_sizes`,
    loss_sizes[0] == n_out + sum of the hidden widths, any output width loss_sizes[-1]);
    adapt_loss: the inner loss, "l1" (mean |g_psi(u)|) or "mse" (mean g_psi(u)^2), the mean
    over the source points and all the loss network's outputs. first_order=True is refused
    (psi would get no gradient). backend: "auto", "fused" or "reference". inner_lr may be a
    tensor of learned rates, as pymaml.functional.maml_loss takes it (broadcastable to
    [steps, P]); one that requires grad gets its gradient too."""
    if loss == "cross_entropy" and isinstance(y_query, torch.Tensor):
        # class indices become one-hot (as in functional); probabilities are checked
        sizes = _checks.check_layer_sizes("sizes", sizes, "[1, 32, 32, 1]")
        if not y_query.is_floating_point():
            _checks.check_params(params, sizes)
        y_query = _checks.class_targets("y_query", y_query, sizes[-1], params)
    data = (x_source, x_query, y_query)
    if _direct(backend, params, loss_params, data, sizes, loss_sizes, inner_lr, steps,
               (activation, loss, adapt_loss), first_order):
        try:
            need_grad = torch.is_grad_enabled() and (params.requires_grad
                                                     or loss_params.requires_grad)
            return _ops.ops.daml_loss(params, loss_params, *data, sizes, loss_sizes, inner_lr,
                                      steps, activation, loss, adapt_loss, need_grad, True)[0]
        except (RuntimeError, TypeError, ValueError):
            pass  # the checked path below words the error, or serves the call otherwise
    sizes, loss_sizes = _check_call(params, loss_params, sizes, loss_sizes, inner_lr, steps,
                                    activation, loss, adapt_loss, first_order)
    T = _checks.check_source(x_source, params, sizes, steps)
    _checks.check_query(x_query, y_query, params, sizes, T)
    learned = isinstance(inner_lr, torch.Tensor)  # learned rates (design.md §8.1)
    which = _choose_backend(backend, params, sizes, loss_sizes, steps, data, None,
                            (loss_params, inner_lr))
    P = num_params(sizes)
    if which == "reference":
        rate = _rates.reference_rates(inner_lr, steps, P) if learned else float(inner_lr)
        return reference_loss(params, loss_params, *data, sizes=sizes, loss_sizes=loss_sizes,
                              inner_lr=rate, steps=int(steps), activation=activation,
                              loss=loss, adapt_loss=adapt_loss)
    grad_mode = torch.is_grad_enabled()
    need_rate_grad = grad_mode and learned and inner_lr.requires_grad
    need_grad = need_rate_grad or (grad_mode and (params.requires_grad
                                                  or loss_params.requires_grad))
    # the value form (keep_grad): the loss alone; learned rates as [R, P] rows beside rate 0
    rate, rates = ((0.0, (_rates.rate_rows(inner_lr, params, steps, P), need_rate_grad))
                   if learned else (float(inner_lr), ()))
    return _ops.ops.daml_loss(params, loss_params, *data, sizes, loss_sizes, rate, int(steps),
                              activation, loss, adapt_loss, need_grad, True, *rates)[0]


def daml_adapt(params, loss_params, x_source, *, sizes, loss_sizes, inner_lr, steps,
               activation="relu", adapt_loss="l1", backend="auto") -> torch.Tensor:
    """[T, P]: every task's base parameters after `steps` SGD steps on the learned inner loss
    over its unlabeled source inputs (no labels: test-time adaptation). Arguments as in
    daml_loss. The fused op is not differentiable: when grad mode is on and params or
    loss_params require grad, "auto" runs the reference (differentiable in both, second
    order) and "fused" refuses."""
    data = (x_source,)
    need_grad = torch.is_grad_enabled() and (
        (isinstance(params, torch.Tensor) and params.requires_grad)
        or (isinstance(loss_params, torch.Tensor) and loss_params.requires_grad))
    if not need_grad and _direct(backend, params, loss_params, data, sizes, loss_sizes,
                                 inner_lr, steps, (activation, adapt_loss)):
        try:
            return _ops.ops.daml_adapt(params, loss_params, x_source, sizes, loss_sizes,
                                       inner_lr, steps, activation, adapt_loss)
        except (RuntimeError, TypeError, ValueError):
            pass  # the checked path below words the error, or serves the call otherwise
    sizes, loss_sizes = _check_call(params, loss_params, sizes, loss_sizes, inner_lr, steps,
                                    activation, "l1", adapt_loss, False)
    _checks.check_source(x_source, params, sizes, steps)
    learned = isinstance(inner_lr, torch.Tensor)
    refusal = ("the fused daml_adapt is not differentiable, and params or loss_params requires "
               "grad (use daml_loss for the meta-gradient, or torch.no_grad())" if need_grad
               else "the fused daml_adapt takes one inner rate, not learned ones (a tensor)"
               if learned else None)
    which = _choose_backend(backend, params, sizes, loss_sizes, steps, data, refusal,
                            (loss_params, inner_lr))
    if which == "reference":
        rate = (_rates.reference_rates(inner_lr, steps, num_params(sizes))
                if learned else float(inner_lr))
        return reference_adapt(params, loss_params, x_source, sizes=sizes,
                               loss_sizes=loss_sizes, inner_lr=rate,
                               steps=int(steps), activation=activation, adapt_loss=adapt_loss)
    return _ops.ops.daml_adapt(params, loss_params, x_source, sizes, loss_sizes,
                               float(inner_lr), int(steps), activation, adapt_loss)


# ---- the pure-autograd reference --------------------------------------------------------------
# Arguments as daml_loss / daml_adapt take them (validated there).

_ADAPT_LOSS_FNS = {"l1": lambda h: h.abs().mean(), "mse": lambda h: h.square().mean()}


def taps(weights: List[torch.Tensor], x: torch.Tensor, activation: str) -> torch.Tensor:
    """u [K, n_out + sum hidden]: the base MLP (weights [W0, b0, ...]) on x [K, n_in], its
    output followed by its hidden activations from the last hidden layer to the first."""
    act = _reference.ACTIVATIONS[activation]
    depth = len(weights) // 2
    hidden = []
    h = x
    for l in range(depth):
        h = torch.nn.functional.linear(h, weights[2 * l], weights[2 * l + 1])
        if l + 1 < depth:
            h = act(h)
            hidden.append(h)
    return torch.cat([h] + hidden[::-1], dim=-1)


def adaptation_loss(weights, loss_weights, x, *, activation: str, adapt_loss: str) -> torch.Tensor:
    """La: the loss MLP (ReLU hidden layers, linear output) on the taps of x [K, n_in]; the mean
    of |g_psi(u)| or of g_psi(u)^2 over the K points and the loss_sizes[-1] outputs (all K * m
    entries of h [K, m])."""
    h = _reference.net(loss_weights, taps(weights, x, activation), "relu")
    return _ADAPT_LOSS_FNS[adapt_loss](h)


def inner_loop(weights, loss_weights, x_source, *, inner_lr, steps, activation, adapt_loss,
               functional=False):
    """`steps` SGD steps on La from `weights` (x_source [K_s, n_in], or [steps, K_s, n_in]: step
    k reads batch k). Second order: the graph of every gradient is kept (create_graph=True),
    through which loss_weights get their gradient. functional=True takes the gradients with
    torch.func.grad (under torch.func transforms)."""
    per_step = x_source.dim() == 3
    la = lambda w, k: adaptation_loss(w, loss_weights, x_source[k] if per_step else x_source,
                                      activation=activation, adapt_loss=adapt_loss)
    for k in range(steps):
        if functional:
            grads = torch.func.grad(la)(weights, k)
        else:
            grads = torch.autograd.grad(la(weights, k), weights, create_graph=True)
        # learned rates: inner_lr [steps, P], row k cut like the weights (pymaml.reference)
        rates = ([r.view_as(w) for r, w in zip(inner_lr[k].split([w.numel() for w in weights]),
                                                weights)]
                 if isinstance(inner_lr, torch.Tensor) else [inner_lr] * len(weights))
        weights = [w - r * g for w, r, g in zip(weights, rates, grads)]
    return weights


def _frame(params, loss_params, data, inner_lr, sizes, loss_sizes, task, finish=torch.stack):
    """pymaml.reference's frame, the loss network's weights and the rates shared by the tasks."""
    shared = lambda: ([t for layer in unflatten(_reference._usable(loss_params), loss_sizes)
                       for t in layer], *_reference._usable_rates(inner_lr))
    tensors = (params, loss_params, *data, *_reference.rate_tensors(inner_lr))
    return _reference._result(*_reference.over_tasks(params, sizes, tensors, data, task, shared,
                                                     finish))


def reference_adapt(params, loss_params, x_source, *, sizes, loss_sizes, inner_lr, steps,
                    activation="relu", adapt_loss="l1"):
    """[T, P]: the adapted base parameters of every task (the autograd reference)."""
    def task(weights, functional, psi, rates, xs):
        w = inner_loop(weights, psi, xs, inner_lr=rates, steps=steps, activation=activation,
                       adapt_loss=adapt_loss, functional=functional)
        return torch.cat([p.reshape(-1) for p in w])

    return _frame(params, loss_params, (x_source,), inner_lr, sizes, loss_sizes, task)


def reference_loss(params, loss_params, x_source, x_query, y_query, *, sizes, loss_sizes,
                   inner_lr, steps, activation="relu", loss="l1", adapt_loss="l1"):
    """Scalar: the mean over tasks of the query loss after adapting on the learned inner loss
    (the autograd reference; gradients reach params, loss_params and the data)."""
    def task(weights, functional, psi, rates, xs, xq, yq):
        w = inner_loop(weights, psi, xs, inner_lr=rates, steps=steps, activation=activation,
                       adapt_loss=adapt_loss, functional=functional)
        return _reference._losses(functional)[loss](_reference.net(w, xq, activation), yq)

    return _frame(params, loss_params, (x_source, x_query, y_query), inner_lr, sizes,
                  loss_sizes, task, lambda losses: torch.stack(losses).mean())
