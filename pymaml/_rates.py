"""Learned inner learning rates and frozen layers, as training and models store them: the one
place that knows the modes of learned rates (docs/design.md §8.1: their stored shapes, their
start, their expansion to what the functional API takes, their checks and summary) and
checks `adapt_layers` (§8.2)."""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple

import torch

from . import _checks
from ._layout import num_params

# The stored shape of each mode (S = inner steps, P = parameters, L = linear layers):
#   per-step [S, 1], per-parameter [P] (Meta-SGD), per-layer-step [S, 2L] (one rate per
#   weight matrix and per bias vector per step: MAML++'s LSLR), per-parameter-step [S, P].
MODES = ("per-step", "per-parameter", "per-layer-step", "per-parameter-step")


def check_mode(name: str, mode) -> Optional[str]:
    """`mode` (None: the rate is a fixed number), or ValueError naming `name`."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"{name} must be None or one of {', '.join(map(repr, MODES))}; "
                         f"got {mode!r}")
    return mode


def shape(mode: str, sizes: Sequence[int], steps: int) -> Tuple[int, ...]:
    """The shape the rates of `mode` are stored in."""
    depth = len(sizes) - 1
    return {"per-step": (steps, 1), "per-parameter": (num_params(list(sizes)),),
            "per-layer-step": (steps, 2 * depth),
            "per-parameter-step": (steps, num_params(list(sizes)))}[mode]


def per_step(mode: Optional[str]) -> bool:
    """Whether the rates of `mode` differ per inner step (a row each)."""
    return mode is not None and mode != "per-parameter"


def initial(mode: str, sizes, steps: int, value: float, *, dtype=torch.float32,
            device=None) -> torch.Tensor:
    """The rates of `mode`, every one `value` (the run's inner_lr): where learning starts."""
    return torch.full(shape(mode, sizes, steps), float(value), dtype=dtype, device=device)


def check_stored(name: str, rates, mode: str, sizes, steps: int) -> None:
    """`rates` is a floating-point tensor of the stored shape of `mode`; else TypeError /
    ValueError naming `name`."""
    if not isinstance(rates, torch.Tensor) or not rates.is_floating_point():
        got = rates.dtype if isinstance(rates, torch.Tensor) else type(rates).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    want = shape(mode, sizes, steps)
    if tuple(rates.shape) != want:
        raise ValueError(f"{name} of mode {mode!r} must have shape {list(want)} for sizes "
                         f"{list(sizes)} and {steps} inner step(s), got {list(rates.shape)}")
    if not torch.isfinite(rates.detach()).all():
        raise ValueError(f"{name} holds non-finite rates (NaN or infinite)")


def check_tensor(name: str, rate, steps: int, P: int, dtype: torch.dtype) -> None:
    """A rate tensor a user gives: floating point of `dtype`, broadcastable to [steps, P]
    ([], [P], [steps, 1], [steps, P]); else TypeError / ValueError naming `name`."""
    if not rate.is_floating_point() or rate.dtype != dtype:
        raise TypeError(f"{name} as a tensor must have the weights' dtype ({dtype}), got "
                        f"{rate.dtype}")
    if not _checks.broadcasts_to_steps(rate, steps, P):
        raise ValueError(f"{name} as a tensor must broadcast to [steps, P] = [{steps}, {P}]: "
                         f"[], [{P}], [{steps}, 1] or [{steps}, {P}]; got {list(rate.shape)}")


def for_steps(rates: torch.Tensor, mode: str, sizes, steps: int) -> torch.Tensor:
    """The stored rates as the functional API takes them (broadcastable to [steps, P]),
    differentiably. Adapting for more steps than the rates were learned for reuses the last
    step's rates for the steps beyond; fewer steps use the first ones."""
    if per_step(mode):
        have = rates.shape[0]
        if steps <= have:
            rates = rates[:steps]
        else:
            rates = torch.cat([rates, rates[-1:].expand(steps - have, *rates.shape[1:])])
    if mode == "per-layer-step":
        rates = per_layer_rates(rates, list(sizes))
    return rates


def check_layers(name: str, layers, depth: int) -> Optional[Tuple[int, ...]]:
    """`layers` (None: every layer adapts) as sorted non-negative linear-layer indices, a
    negative index counting from the output ([-1] is the head); TypeError / ValueError
    naming `name` for anything else."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"{name} must be None or a list of linear-layer indices such as [-1], "
                        f"got {layers!r}")
    if not layers:
        raise ValueError(f"{name} must name at least one layer to adapt (None: all of them)")
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"{name} must hold ints (layer indices), got {layers!r}")
        if not -depth <= i < depth:
            raise ValueError(f"{name} index {i} is out of range for a network of {depth} "
                             f"linear layer(s) (0..{depth - 1}, or -{depth}..-1)")
        out.append(int(i) % depth)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} names a layer twice: {list(layers)}")
    return tuple(sorted(out))


def summary(rates: torch.Tensor, mode: str, sizes,
            layers: Optional[Sequence[int]] = None) -> List[Tuple[str, float, float, float]]:
    """(label, mean, min, max) of the learned rates: one row per weight matrix and bias
    vector ("W0", "b0", ...; "frozen" ones, which never move, marked), over every step;
    then, where rates differ per step, one row per step ("step k") over every adapted
    entry."""
    sizes = list(sizes)
    r = rates.detach().double().cpu()
    steps = r.shape[0] if per_step(mode) else 1
    full = for_steps(r, mode, sizes, steps).expand(steps, num_params(sizes))
    depth = len(sizes) - 1
    adapted = range(depth) if layers is None else layers
    rows, keep, at = [], torch.zeros(full.shape[1], dtype=torch.bool), 0
    for l in range(depth):
        for kind, n in (("W", sizes[l] * sizes[l + 1]), ("b", sizes[l + 1])):
            part = full[:, at:at + n]
            label = f"{kind}{l}" + ("" if l in adapted else " (frozen)")
            rows.append((label, part.mean().item(), part.min().item(), part.max().item()))
            keep[at:at + n] = l in adapted
            at += n
    if steps > 1:
        for k in range(steps):
            part = full[k, keep]
            rows.append((f"step {k}", part.mean().item(), part.min().item(), part.max().item()))
    return rows


def per_layer_rates(rates: torch.Tensor, sizes) -> torch.Tensor:
    """MAML++'s per-layer rates (LSLR) as per-parameter ones: rates [..., 2 * layers], one for
    every weight matrix and every bias vector in the flat order [W0, b0, W1, b1, ...], becomes
    [..., P], each rate repeated over its tensor's entries. Differentiable: pass the result
    as inner_lr (e.g. rates [steps, 2 * layers] gives [steps, P])."""
    sizes = _checks.check_sizes(sizes)
    if not isinstance(rates, torch.Tensor):
        raise TypeError(f"rates must be a torch.Tensor, got {type(rates).__name__}")
    tensors = 2 * (len(sizes) - 1)
    if rates.dim() < 1 or rates.shape[-1] != tensors:
        raise ValueError(f"rates must be [..., {tensors}] (one rate per weight and per bias of "
                         f"{tensors // 2} layers), got shape {list(rates.shape)}")
    counts = [n for i, o in zip(sizes[:-1], sizes[1:]) for n in (o * i, o)]
    return torch.repeat_interleave(rates, torch.tensor(counts, device=rates.device), dim=-1,
                                   output_size=num_params(sizes))


def rate_rows(inner_lr, params, steps: int, P: int) -> torch.Tensor:
    """The rates as the *_rates ops take them: [steps, P] when they differ between steps, else
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


def reference_rates(inner_lr, steps: int, P: int):
    return inner_lr.expand(steps, P) if isinstance(inner_lr, torch.Tensor) else inner_lr
