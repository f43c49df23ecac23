"""pymaml's argument checks, in one place: each raises TypeError / ValueError naming the
argument and what was expected. Every layer of the package checks with these (the public
functions, the models, the run configuration), so a rule is written and worded once."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

from ._layout import num_params

__all__ = []  # internal: pymaml.functional re-exports the names users read

ACTIVATIONS = ("relu", "tanh")
LOSSES = ("mse", "l1", "cross_entropy")  # cross_entropy: softmax cross-entropy on class labels
BACKENDS = ("auto", "fused", "reference")
ADAPT_LOSSES = ("l1", "mse")  # DAML's inner loss on the loss network's outputs


# ---- argument checks ------------------------------------------------------------------------

def check_sizes(sizes) -> list:
    return check_layer_sizes("sizes", sizes, "[1, 40, 40, 1]")


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def check_device(name: str, device) -> torch.device:
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
    except Exception:  # a device type this build lacks (torch says so in pages, or ImportError)
        raise ValueError(f"{name} {str(device)!r} is not available in this torch build "
                         f"({torch.__version__}) on this machine: use {' or '.join(usable_devices())}"
                         ) from None
    return device


def usable_devices():
    """The device types this torch build can make tensors on here ("cpu", "cuda", ...)."""
    found = ["cpu"]
    for kind in ("cuda", "mps", "xpu"):
        module = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, kind, None)
        try:
            if module is not None and module.is_available():
                found.append(kind)
        except Exception:  # a half-built backend: not usable
            pass
    return found


def check_params(params, sizes, allow_batched=False) -> None:
    check_flat("params", params, sizes, allow_batched=allow_batched)


def check_data(params, sizes, steps=None, **named) -> int:
    """Checks [T, K, features] data tensors against params; returns T. With `steps` given,
    x_support and y_support may be [T, steps, K, features] instead: a batch per inner step."""
    T = None
    for name, t in named.items():
        check_tensor(name, t, params)
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


def check_hyper(inner_lr, steps, activation, loss, first_order, dtype) -> None:
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
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("loss", loss, LOSSES)
    if not isinstance(first_order, bool):
        raise TypeError(f"first_order must be a bool, got {type(first_order).__name__}")


def check_rates(inner_lr, params, sizes, steps) -> Optional[torch.Tensor]:
    """A tensor inner_lr, checked (broadcastable to [steps, P], params' dtype and device,
    finite); None for a number (checked by check_hyper)."""
    if not isinstance(inner_lr, torch.Tensor):
        return None
    P = num_params(sizes)
    if inner_lr.dtype != params.dtype:
        raise TypeError(f"inner_lr must have the dtype of params ({params.dtype}), got {inner_lr.dtype}")
    if inner_lr.device != params.device:
        raise ValueError(f"inner_lr must be on the device of params ({params.device}), got {inner_lr.device}")
    if not broadcasts_to_steps(inner_lr, steps, P):
        raise ValueError(f"inner_lr as a tensor must broadcast to [steps, P] = [{steps}, {P}]: "
                         f"[], [{P}] (a rate per parameter), [{steps}, 1] (per step) or "
                         f"[{steps}, {P}]; got shape {list(inner_lr.shape)}")
    # Values cannot be read while torch.compile traces (fullgraph would break on the branch)
    # nor under a torch.func transform: a non-finite rate then gives a non-finite loss.
    if (not torch.compiler.is_compiling() and not wrapped_by_transform((inner_lr,))
            and not bool(torch.isfinite(inner_lr.detach()).all())):
        raise ValueError("inner_lr must hold finite rates, got a non-finite entry")
    return inner_lr


def broadcasts_to_steps(rate: torch.Tensor, steps: int, P: int) -> bool:
    """Whether a rate tensor broadcasts to [steps, P] (at most 2 dimensions)."""
    try:
        return rate.dim() <= 2 and torch.broadcast_shapes(rate.shape, (steps, P)) == (steps, P)
    except RuntimeError:
        return False


def wrapped_by_transform(tensors) -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev...) has wrapped any of the tensors."""
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return wrapped is not None and any(wrapped(t) for t in tensors)


def check_adapt_layers(adapt_layers, sizes) -> Optional[list]:
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


def check_layer_sizes(name: str, sizes, example: str) -> list:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"{name} must be a sequence of layer widths like {example}, got {sizes!r}")
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"{name} must list at least an input and an output width, got {sizes}")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name} must hold positive integers, got {sizes}")
    return [int(n) for n in sizes]


def loss_input_width(sizes: Sequence[int]) -> int:
    """loss_sizes[0] for a base network with layer sizes `sizes`: the width of
    u = cat[output, last hidden, ..., first hidden], n_out + sum of the hidden widths."""
    return sizes[-1] + sum(sizes[1:-1])


def check_daml_sizes(sizes, loss_sizes):
    sizes = check_layer_sizes("sizes", sizes, "[1, 32, 32, 1]")
    loss_sizes = check_layer_sizes("loss_sizes", loss_sizes, "[65, 32, 32, 1]")
    width = loss_input_width(sizes)
    if loss_sizes[0] != width:
        hidden = " + ".join(map(str, sizes[1:-1])) or "0"
        raise ValueError(f"loss_sizes[0] must be the width of the loss network's input u = "
                         f"[output, last hidden, ..., first hidden], n_out + sum of the hidden "
                         f"widths = {sizes[-1]} + {hidden} = {width} for sizes {sizes}; got "
                         f"loss_sizes {loss_sizes}")
    return sizes, loss_sizes  # any output width: La is the mean over all of h's entries


def check_flat(name: str, t, sizes, size_name: str = "sizes", dtype=None, device=None,
               allow_batched=False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of params ({dtype}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the device of params ({device}), got {t.device}")
    P = num_params(sizes)
    ranks = "[P] or [T, P]" if allow_batched else "[P]"
    if t.dim() not in ((1, 2) if allow_batched else (1,)) or t.shape[-1] != P:
        raise ValueError(f"{name} must be {ranks} with P = {P} for {size_name} {sizes}, got "
                         f"shape {list(t.shape)}")


def check_tensor(name: str, t, params) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != params.dtype:
        hint = (" (integer class labels are for loss='cross_entropy')"
                if name.startswith("y") and is_integer(t) else "")
        raise TypeError(f"{name} must have the dtype of params ({params.dtype}), got "
                        f"{t.dtype}{hint}")
    if t.device != params.device:
        raise ValueError(f"{name} must be on the device of params ({params.device}), got {t.device}")


def check_source(x_source, params, sizes, steps) -> int:
    """Checks x_source ([T, K_s, n_in] or [T, steps, K_s, n_in]); returns T."""
    check_tensor("x_source", x_source, params)
    n_in = sizes[0]
    if x_source.dim() == 4:
        if x_source.shape[1] != steps or x_source.shape[3] != n_in:
            raise ValueError(f"x_source [T, steps, K_s, {n_in}] holds a batch per inner step "
                             f"(steps = {steps}), got shape {list(x_source.shape)}")
    elif x_source.dim() != 3 or x_source.shape[2] != n_in:
        raise ValueError(f"x_source must be [T, K_s, {n_in}] (the same inputs at every inner "
                         f"step) or [T, steps, K_s, {n_in}] (a batch per step), got shape "
                         f"{list(x_source.shape)}")
    if x_source.shape[0] < 1:
        raise ValueError(f"the meta-batch needs at least one task, got x_source of shape "
                         f"{list(x_source.shape)}")
    if x_source.shape[-2] < 1:
        raise ValueError(f"x_source needs at least one source point per step, got shape "
                         f"{list(x_source.shape)}")
    return x_source.shape[0]


def check_query(x_query, y_query, params, sizes, T) -> None:
    for name, t, features in (("x_query", x_query, sizes[0]), ("y_query", y_query, sizes[-1])):
        check_tensor(name, t, params)
        if t.dim() != 3 or t.shape[2] != features:
            raise ValueError(f"{name} must be [T, Q, {features}], got shape {list(t.shape)}")
        if t.shape[0] != T:
            raise ValueError(f"{name} has {t.shape[0]} tasks but x_source has {T}")
        if t.shape[1] < 1:
            raise ValueError(f"{name} needs at least one point, got shape {list(t.shape)}")
    if x_query.shape[1] != y_query.shape[1]:
        raise ValueError(f"x_query and y_query must have the same number of points, got "
                         f"{list(x_query.shape)} and {list(y_query.shape)}")


# ---- class labels (loss="cross_entropy") ----------------------------------------------------

def is_integer(t: torch.Tensor) -> bool:
    """Whether t holds integers (class indices), not real, complex or bool values."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


_INDEX_SHAPES = {2: "[T, K]", 3: "[T, steps, K] (a batch per inner step)"}


def check_probabilities(name: str, y, n_out: int):
    """y, when it is a floating tensor of class probabilities [..., n_out]: every row
    non-negative and summing to 1 up to rounding; ValueError naming `name` otherwise (anything
    else, another shape included, is returned as it is, for the shape checks to word)."""
    if (not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.numel() == 0
            or y.dim() < 3 or y.shape[-1] != n_out):
        return y
    rows = y.detach()
    # Rounding, not mistakes: probabilities made in float32 (a softmax, say) and cast to
    # float64 sum to 1 only to float32's precision.
    tolerance = 1e-5 + 16 * rows.shape[-1] * torch.finfo(torch.float32).eps
    if not bool((rows >= 0).all()) or not bool(((rows.sum(-1) - 1).abs() <= tolerance).all()):
        raise ValueError(f"{name} as class probabilities must be non-negative and sum to 1 over "
                         f"its last dimension (one row per point; or give int64 class indices)")
    return y


def class_targets(name: str, y, n_out: int, like: torch.Tensor, ranks=(2,)):
    """Cross-entropy's targets: y as it is when it is not an integer tensor (class
    probabilities [..., n_out], checked with the other data), or integer class indices, one
    per point, as one-hot class probabilities [..., n_out] of the dtype and on the device of
    `like` (params, or the batch's inputs). `ranks`: the numbers of dimensions the indices may
    have ([T, K] by default; None: any). ValueError naming `name` for another shape, another
    device or an index outside [0, n_out)."""
    if not isinstance(y, torch.Tensor) or not is_integer(y):
        return check_probabilities(name, y, n_out)
    if ranks is not None and y.dim() not in ranks:
        shapes = " or ".join(_INDEX_SHAPES[r] for r in ranks)
        raise ValueError(f"{name} as class indices must be {shapes}, one integer per point, or "
                         f"class probabilities [..., {n_out}] of params' dtype; got integer "
                         f"shape {list(y.shape)}")
    if y.device != like.device:
        raise ValueError(f"{name} must be on the device of params ({like.device}), got {y.device}")
    if y.numel():
        low, high = (int(v) for v in torch.aminmax(y))
        if low < 0 or high >= n_out:
            raise ValueError(f"{name} holds class index {low if low < 0 else high}, outside "
                             f"[0, {n_out}): the network has sizes[-1] = {n_out} outputs, one "
                             f"per class")
    return torch.nn.functional.one_hot(y.long(), n_out).to(like.dtype)
