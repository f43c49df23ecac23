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
import numbers
import warnings
from typing import Optional, Sequence

import torch

from . import _ops
from . import reference as _reference
from ._layout import num_params, unflatten

__all__ = ["init_params", "mlp_forward", "adapt", "maml_loss", "num_params", "per_layer_rates"]

ACTIVATIONS = ("relu", "tanh")
LOSSES = ("mse", "l1")
BACKENDS = ("auto", "fused", "reference")


# ---- argument checks ------------------------------------------------------------------------

def _check_sizes(sizes) -> list:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"sizes must be a sequence of layer widths like [1, 40, 40, 1], got {sizes!r}")
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least an input and an output width, got {sizes}")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"sizes must hold positive integers, got {sizes}")
    return [int(n) for n in sizes]


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def _check_device(name: str, device) -> torch.device:
    """`device` as a torch.device on which tensors can be made here; ValueError naming `name`
    and saying why not (the meta device holds no data, a CUDA device needs CUDA)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch device like 'cpu' or 'cuda', got "
                         f"{device!r}") from None
    if device.type == "meta":
        raise ValueError(f"{name} 'meta' is not supported: meta tensors hold no numbers to "
                         "train or adapt; use 'cpu' or 'cuda'")
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"{name} {str(device)!r} is not usable here: this torch build "
                             f"({torch.__version__}) has no CUDA support")
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"{name} {str(device)!r} is not usable here: this machine has "
                             f"{count} CUDA device(s) visible to torch")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # e.g. a device type this build lacks
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{name} {str(device)!r} is not usable here: {text}") from None
    return device


def _check_params(params, sizes, allow_batched=False) -> None:
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"params must be a torch.Tensor, got {type(params).__name__}")
    if not params.is_floating_point():
        raise TypeError(f"params must be a floating-point tensor, got dtype {params.dtype}")
    P = num_params(sizes)
    ranks = "[P] or [T, P]" if allow_batched else "[P]"
    if params.dim() not in ((1, 2) if allow_batched else (1,)) or params.shape[-1] != P:
        raise ValueError(f"params must be {ranks} with P = {P} for sizes {sizes}, "
                         f"got shape {list(params.shape)}")


def _check_data(params, sizes, steps=None, **named) -> int:
    """Checks [T, K, features] data tensors against params; returns T. With `steps` given,
    x_support and y_support may be [T, steps, K, features] instead: a batch per inner step."""
    T = None
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != params.dtype:
            raise TypeError(f"{name} must have the dtype of params ({params.dtype}), got {t.dtype}")
        if t.device != params.device:
            raise ValueError(f"{name} must be on the device of params ({params.device}), got {t.device}")
        features = sizes[0] if name.startswith("x") else sizes[-1]
        if steps is not None and name.endswith("_support") and t.dim() == 4:
            if steps < 1 or t.shape[1] != steps:
                raise ValueError(f"{name} [T, steps, K, {features}] holds a batch per inner step "
                                 f"(steps = {steps}, at least 1), got shape {list(t.shape)}")
            t = t[:, 0]
        if t.dim() != 3 or t.shape[2] != features:
            raise ValueError(f"{name} must be [T, K, {features}], got shape {list(t.shape)}")
        if t.shape[1] < 1:
            raise ValueError(f"{name} needs at least one point, got shape {list(t.shape)}")
        if T is None:
            T = t.shape[0]
        elif t.shape[0] != T:
            first = next(iter(named))
            raise ValueError(f"{name} has {t.shape[0]} tasks but {first} has {T}")
    if T < 1:
        raise ValueError(f"the meta-batch needs at least one task, got {T}")
    names = list(named)
    for x_name, y_name in zip(names[0::2], names[1::2]):
        x, y = named[x_name], named[y_name]
        if x.dim() != y.dim() or x.shape[1:-1] != y.shape[1:-1]:
            raise ValueError(f"{x_name} and {y_name} must have the same number of points, got "
                             f"{list(x.shape)} and {list(y.shape)}")
    return T


def _check_hyper(inner_lr, steps, activation, loss, first_order, dtype) -> None:
    if isinstance(inner_lr, bool) or not isinstance(inner_lr, numbers.Real):
        raise TypeError(f"inner_lr must be a real number, got {type(inner_lr).__name__}")
    try:
        finite = math.isfinite(inner_lr) and abs(float(inner_lr)) <= torch.finfo(dtype).max
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ValueError(f"inner_lr must be finite in {dtype}, got {inner_lr}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("loss", loss, LOSSES)
    if not isinstance(first_order, bool):
        raise TypeError(f"first_order must be a bool, got {type(first_order).__name__}")


def _check_rates(inner_lr, params, sizes, steps) -> Optional[torch.Tensor]:
    """A tensor inner_lr, checked (broadcastable to [steps, P], params' dtype and device,
    finite); None for a number (checked by _check_hyper)."""
    if not isinstance(inner_lr, torch.Tensor):
        return None
    P = num_params(sizes)
    if inner_lr.dtype != params.dtype:
        raise TypeError(f"inner_lr must have the dtype of params ({params.dtype}), got {inner_lr.dtype}")
    if inner_lr.device != params.device:
        raise ValueError(f"inner_lr must be on the device of params ({params.device}), got {inner_lr.device}")
    try:
        fits = inner_lr.dim() <= 2 and torch.broadcast_shapes(inner_lr.shape, (steps, P)) == (steps, P)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"inner_lr as a tensor must broadcast to [steps, P] = [{steps}, {P}]: "
                         f"[], [{P}] (a rate per parameter), [{steps}, 1] (per step) or "
                         f"[{steps}, {P}]; got shape {list(inner_lr.shape)}")
    if not bool(torch.isfinite(inner_lr.detach()).all()):
        raise ValueError("inner_lr must hold finite rates, got a non-finite entry")
    return inner_lr


def _check_adapt_layers(adapt_layers, sizes) -> Optional[list]:
    """adapt_layers as sorted layer indices, or None when every layer adapts."""
    if adapt_layers is None:
        return None
    depth = len(sizes) - 1
    if isinstance(adapt_layers, (str, bytes)) or not isinstance(adapt_layers, Sequence):
        raise TypeError(f"adapt_layers must be None or a list of layer indices like [-1], "
                        f"got {adapt_layers!r}")
    layers = []
    for l in adapt_layers:
        if isinstance(l, bool) or not isinstance(l, numbers.Integral) or not -depth <= l < depth:
            raise ValueError(f"adapt_layers entries must be ints in [{-depth}, {depth}) for "
                             f"{depth} linear layers, got {list(adapt_layers)!r}")
        layers.append(int(l) % depth)
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"adapt_layers must name at least one layer, each once, got "
                         f"{list(adapt_layers)!r}")
    return None if len(layers) == depth else sorted(layers)


def _rate_rows(inner_lr, params, steps: int, P: int) -> torch.Tensor:
    """The rates as the ops take them: [steps, P] when they differ between steps, else
    [1, P] (a view where it can be: autograd sums the gradient back to inner_lr's shape)."""
    if not isinstance(inner_lr, torch.Tensor):
        return params.new_full((1, P), float(inner_lr))
    if inner_lr.dim() > 2:
        raise RuntimeError("inner_lr has more than 2 dimensions")
    if steps == 0 or (inner_lr.dim() == 2 and inner_lr.shape[0] == steps and steps > 1):
        return inner_lr.expand(steps, P)  # steps 0: [0, P], no rate is read
    if inner_lr.shape[-1:] == (P,):  # [P] or [1, P]: a view, whose backward is no reduction
        return inner_lr.view(1, P)
    return inner_lr.expand(1, P)


def _reference_rates(inner_lr, steps: int, P: int):
    return inner_lr.expand(steps, P) if isinstance(inner_lr, torch.Tensor) else inner_lr


def _fused_unsupported(params, sizes, steps) -> Optional[str]:
    reason = _ops.unavailable_reason(params.device, params.dtype)
    if reason:
        return reason
    limits = _ops._C  # the compiled core states its own limits (the reference has none)
    if len(sizes) - 1 > limits.max_depth:
        return f"the fused op supports up to {limits.max_depth} layers, got {len(sizes) - 1}"
    if max(sizes) > limits.max_width:
        return f"the fused op supports widths up to {limits.max_width}, got {max(sizes)}"
    if steps > limits.max_steps:
        return f"the fused op supports up to {limits.max_steps} steps, got {steps}"
    return None


def _under_torch_func(tensors) -> bool:
    # The fused ops have no vmap / functorch-grad rules: tensors that torch.func transforms
    # wrap (grad, vmap) need the reference.
    # (torch.compile traces plain tensors here, and cannot trace this check.)
    if torch.compiler.is_compiling():
        return False
    functorch = getattr(torch._C, "_functorch", None)
    # No transform running (a user's plain loop): nothing is wrapped, and asking costs 0.1 us
    # where looking at every tensor costs 2-3 us of the ~20 us hot path.
    peek = getattr(functorch, "peek_interpreter_stack", None)
    if peek is not None and peek() is None:
        return False
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is not None and any(wrapped(t) for t in tensors)


def _direct_to_fused(backend, params, data, sizes, inner_lr, steps, activation, loss,
                     first_order) -> bool:
    """Whether a call may go straight to the fused op, which checks every argument itself (in
    C++, csrc/op_args.cpp): the hot path of a user's loop, a few microseconds. Only the
    conditions the op cannot see are checked here. Any error the op raises sends the call
    down the checked path, which words it in pymaml's terms or picks the reference backend
    (steps or widths over the op's limits, half precision, ...): see _choose_backend."""
    return ((backend == "auto" or backend == "fused") and _ops.available()
            # The dispatcher converts more than pymaml accepts (a bool for a number and back, a
            # tensor for a number, bytes for a string): only the plain types go straight on.
            and isinstance(inner_lr, (float, int)) and type(inner_lr) is not bool
            and type(steps) is int and (first_order is True or first_order is False)
            and type(sizes) in (list, tuple) and all(type(n) is int for n in sizes)
            and type(activation) is str and type(loss) is str
            and not torch.compiler.is_compiling()  # the checked path traces without breaks
            and isinstance(params, torch.Tensor) and params.device.type in ("cpu", "cuda")
            and all(isinstance(t, torch.Tensor) for t in data)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in data))
            and not _under_torch_func((params, *data)))


def _direct_rule(params, inner_lr, adapt_layers, sizes, steps):
    """For a call with learned rates or adapt_layers that may go straight to the ops with
    rates (as _direct_to_fused says for the rest): (rates [R, P], layers, None for every
    layer); None otherwise. The op checks the rest (finite rates, layer range, duplicates) and
    any error it raises sends the call down the checked path."""
    if type(adapt_layers) not in (list, tuple, type(None)):
        return None
    if adapt_layers is not None and not all(type(l) is int for l in adapt_layers):
        return None
    if isinstance(inner_lr, torch.Tensor):
        if (inner_lr.dtype != params.dtype or inner_lr.device.type != "cpu"
                or params.device.type != "cpu" or _under_torch_func((inner_lr,))):
            return None
    elif params.device.type != "cpu":
        return None
    try:
        P = num_params(sizes)
        rates = _rate_rows(inner_lr, params, steps, P)
    except RuntimeError:  # a shape that does not broadcast: the checked path says so
        return None
    return rates, None if adapt_layers is None else list(adapt_layers)


def _choose_backend(backend, params, sizes, steps, data, rule=False) -> str:
    """rule: the call has learned rates or frozen layers (rates and adapt_layers, CPU only)."""
    _check_choice("backend", backend, BACKENDS)
    if backend == "reference":
        return backend
    reason = _fused_unsupported(params, sizes, steps)
    if reason is None and rule and params.device.type != "cpu":
        reason = "tensor rates and adapt_layers run on the CPU kernels only"
    if reason is None and torch.is_grad_enabled() and any(t.requires_grad for t in data):
        reason = "the fused op differentiates params only, and a data tensor requires grad"
    if reason is None and data and data[0].dim() == 4 and params.device.type != "cpu":
        reason = "a support batch per inner step runs on the CPU kernels only"
    if reason is None and _under_torch_func((params, *data)):
        reason = "the fused op does not support torch.func transforms (grad, vmap)"
    return _backend_for(backend, reason, steps)


def _backend_for(backend, reason, steps) -> str:
    """"fused" when nothing stands in its way (reason None); else the reference under "auto"
    (warning when the step count alone sent it there), an error under "fused"."""
    if reason is None:
        return "fused"
    if backend == "fused":
        raise RuntimeError(f"backend='fused' cannot serve this call: {reason}; "
                           "use backend='reference' or 'auto'")
    if _ops.available() and steps > _ops._C.max_steps:
        # Not silently: the reference's Python loop may not end in any useful time.
        warnings.warn(f"backend='auto': steps={steps} is beyond the fused op's limit of "
                      f"{_ops._C.max_steps}, so the autograd reference runs it, a Python loop "
                      f"of {steps} inner steps per task (second order: a graph that grows with "
                      "every step), far slower than the fused op; pass backend='reference' to "
                      "choose it knowingly, or use fewer steps", RuntimeWarning, stacklevel=4)
    return "reference"


# ---- public API -----------------------------------------------------------------------------

def init_params(sizes, *, generator: Optional[torch.Generator] = None,
                dtype: torch.dtype = torch.float32, device=None,
                zero_bias: bool = False) -> torch.Tensor:
    """A flat [P] parameter vector with nn.Linear's default initialisation: W and b uniform in
    ±1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5) for W). zero_bias=True gives the seed's
    initialisation instead: the same W, biases zero."""
    sizes = _check_sizes(sizes)
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
    sizes = _check_sizes(sizes)
    _check_params(params, sizes, allow_batched=True)
    _check_choice("activation", activation, ACTIVATIONS)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != params.dtype or x.device != params.device:
        raise TypeError(f"x must have the dtype and device of params ({params.dtype}, "
                        f"{params.device}), got ({x.dtype}, {x.device})")
    batched = params.dim() == 2
    if x.dim() < 1 or x.shape[-1] != sizes[0] or (batched and (x.dim() != 3 or x.shape[0] != params.shape[0])):
        want = f"[{params.shape[0]}, N, {sizes[0]}]" if batched else f"[..., {sizes[0]}]"
        raise ValueError(f"x must be {want}, got shape {list(x.shape)}")
    act = _reference.ACTIVATIONS[activation]
    layers = unflatten(params, sizes)
    h = x
    for l, (W, b) in enumerate(layers):
        # [T, N, in] @ [T, in, out] + [T, 1, out]  or  [..., in] @ [in, out] + [out]
        h = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2)) if batched else torch.nn.functional.linear(h, W, b)
        if l + 1 < len(layers):
            h = act(h)
    return h


def per_layer_rates(rates: torch.Tensor, sizes) -> torch.Tensor:
    """MAML++'s per-layer rates (LSLR) as per-parameter ones: rates [..., 2 * layers], one for
    every weight matrix and every bias vector in the flat order [W0, b0, W1, b1, ...], becomes
    [..., P], each rate repeated over its tensor's entries. Differentiable: pass the result
    as inner_lr (e.g. rates [steps, 2 * layers] gives [steps, P])."""
    sizes = _check_sizes(sizes)
    if not isinstance(rates, torch.Tensor):
        raise TypeError(f"rates must be a torch.Tensor, got {type(rates).__name__}")
    tensors = 2 * (len(sizes) - 1)
    if rates.dim() < 1 or rates.shape[-1] != tensors:
        raise ValueError(f"rates must be [..., {tensors}] (one rate per weight and per bias of "
                         f"{tensors // 2} layers), got shape {list(rates.shape)}")
    counts = [n for i, o in zip(sizes[:-1], sizes[1:]) for n in (o * i, o)]
    return torch.repeat_interleave(rates, torch.tensor(counts, device=rates.device), dim=-1,
                                   output_size=num_params(sizes))


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
    rule = adapt_layers is not None or isinstance(inner_lr, torch.Tensor)
    if _direct_to_fused(backend, params, (x_support, y_support), sizes,
                        0.0 if rule else inner_lr, steps, activation, loss, first_order):
        try:
            if not rule:
                return _ops.ops.adapt(params, x_support, y_support, sizes, inner_lr, steps,
                                      activation, loss, first_order)
            direct = _direct_rule(params, inner_lr, adapt_layers, sizes, steps)
            if direct is not None:
                return _ops.ops.adapt(params, x_support, y_support, sizes, 0.0, steps,
                                      activation, loss, first_order, *direct)
        except (RuntimeError, TypeError, ValueError):
            pass  # the checked path below words the error, or serves the call otherwise
    sizes, rates, layers = _check_call(params, sizes, inner_lr, steps, activation, loss,
                                       first_order, adapt_layers)
    _check_data(params, sizes, steps, x_support=x_support, y_support=y_support)
    rule = rates is not None or layers is not None
    which = _choose_backend(backend, params, sizes, steps, (x_support, y_support), rule)
    P = num_params(sizes)
    if which == "reference":
        return _reference.adapt(params, x_support, y_support, sizes=sizes,
                                inner_lr=_reference_rates(inner_lr, steps, P), steps=steps,
                                activation=activation, loss=loss, first_order=first_order,
                                adapt_layers=layers)
    if rule:
        return _ops.ops.adapt(params, x_support, y_support, sizes, 0.0, int(steps), activation,
                              loss, first_order, _rate_rows(inner_lr, params, steps, P), layers)
    return _ops.ops.adapt(params, x_support, y_support, sizes, float(inner_lr), int(steps),
                          activation, loss, first_order)


def _check_call(params, sizes, inner_lr, steps, activation, loss, first_order, adapt_layers):
    """The checked path's common checks: (sizes, the rates tensor or None, adapt_layers
    normalised or None)."""
    sizes = _check_sizes(sizes)
    _check_params(params, sizes)
    number = 0.0 if isinstance(inner_lr, torch.Tensor) else inner_lr
    _check_hyper(number, steps, activation, loss, first_order, params.dtype)
    return sizes, _check_rates(inner_lr, params, sizes, steps), _check_adapt_layers(adapt_layers, sizes)


def maml_loss(params, x_support, y_support, x_query, y_query, *, sizes, inner_lr, steps,
              activation="relu", loss="mse", first_order=False, adapt_layers=None,
              backend="auto") -> torch.Tensor:
    """Scalar: the mean over the T tasks of the query loss after adapting on the support set
    (as in adapt: [T, K, ...], or a batch per inner step [T, steps, K, ...]). `.backward()`
    leaves the meta-gradient (MAML, or FO-MAML with first_order=True) in params.grad, ready
    for any torch.optim optimizer, and in inner_lr.grad when inner_lr is a tensor that
    requires grad (learned rates, as adapt describes them; adapt_layers likewise)."""
    data = (x_support, y_support, x_query, y_query)
    rule = adapt_layers is not None or isinstance(inner_lr, torch.Tensor)
    if _direct_to_fused(backend, params, data, sizes, 0.0 if rule else inner_lr, steps,
                        activation, loss, first_order):
        try:
            grad_mode = torch.is_grad_enabled()
            if not rule:  # the value form (keep_grad): the loss alone
                return _ops.ops.maml_loss(params, *data, sizes, inner_lr, steps, activation,
                                          loss, first_order, grad_mode and params.requires_grad,
                                          True)[0]
            direct = _direct_rule(params, inner_lr, adapt_layers, sizes, steps)
            if direct is not None:
                need_rate_grad = grad_mode and isinstance(inner_lr, torch.Tensor) and inner_lr.requires_grad
                need_grad = need_rate_grad or (grad_mode and params.requires_grad)
                return _ops.ops.maml_loss(params, *data, sizes, 0.0, steps, activation, loss,
                                          first_order, need_grad, True, *direct,
                                          need_rate_grad)[0]
        except (RuntimeError, TypeError, ValueError):
            pass  # the checked path below words the error, or serves the call otherwise
    sizes, rates, layers = _check_call(params, sizes, inner_lr, steps, activation, loss,
                                       first_order, adapt_layers)
    _check_data(params, sizes, steps, x_support=x_support, y_support=y_support,
                x_query=x_query, y_query=y_query)
    rule = rates is not None or layers is not None
    which = _choose_backend(backend, params, sizes, steps, data, rule)
    P = num_params(sizes)
    if which == "reference":
        return _reference.maml_loss(params, *data, sizes=sizes,
                                    inner_lr=_reference_rates(inner_lr, steps, P), steps=steps,
                                    activation=activation, loss=loss, first_order=first_order,
                                    adapt_layers=layers)
    grad_mode = torch.is_grad_enabled()
    need_grad = grad_mode and (params.requires_grad or (rates is not None and rates.requires_grad))
    if rule:
        need_rate_grad = need_grad and rates is not None and rates.requires_grad
        return _ops.ops.maml_loss(params, *data, sizes, 0.0, int(steps), activation, loss,
                                  first_order, need_grad, True,
                                  _rate_rows(inner_lr, params, steps, P), layers,
                                  need_rate_grad)[0]
    return _ops.ops.maml_loss(params, *data, sizes, float(inner_lr), int(steps), activation, loss,
                              first_order, need_grad, True)[0]


# ---- DAML: a learned inner loss on unlabeled inputs (pymaml/daml.py) ------------------------

from .daml import daml_adapt, daml_loss  # noqa: E402  (daml.py uses the checks above)

__all__ += ["daml_loss", "daml_adapt"]
