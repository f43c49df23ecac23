"""Conversion between nn.Sequential MLPs (Linear / ReLU / Tanh) and pymaml's flat parameters."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from ._layout import flatten, unflatten

_ACTIVATION_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh}


def from_sequential(model: nn.Sequential) -> Tuple[torch.Tensor, List[int], str]:
    """(params [P], sizes, activation) of an nn.Sequential alternating Linear layers and one
    kind of activation, ending with a Linear. params is a detached copy."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    linears, activation = [], None
    for i, m in enumerate(model):
        expect_linear = i % 2 == 0
        if expect_linear:
            if not isinstance(m, nn.Linear) or m.bias is None:
                raise ValueError(f"model[{i}] must be an nn.Linear with bias, got {m}")
            if linears and m.in_features != linears[-1].out_features:
                raise ValueError(f"model[{i}] takes {m.in_features} inputs but the previous "
                                 f"Linear gives {linears[-1].out_features}")
            linears.append(m)
            continue
        name = next((k for k, cls in _ACTIVATION_MODULES.items() if type(m) is cls), None)
        if name is None or (activation is not None and name != activation):
            raise ValueError(f"model[{i}] must be nn.ReLU or nn.Tanh (one kind throughout), got {m}")
        activation = name
    if not linears or len(model) % 2 == 0:
        raise ValueError("model must alternate Linear and activation layers and end with a Linear")
    sizes = [linears[0].in_features] + [m.out_features for m in linears]
    params = flatten([t for m in linears for t in (m.weight, m.bias)]).detach().clone()
    return params, sizes, activation or "relu"


def to_sequential(params: torch.Tensor, sizes, activation: str = "relu") -> nn.Sequential:
    """An nn.Sequential holding a copy of params [P] (the inverse of from_sequential)."""
    from .functional import _check_params, _check_sizes, _check_choice, ACTIVATIONS

    sizes = _check_sizes(sizes)
    _check_params(params, sizes)
    _check_choice("activation", activation, ACTIVATIONS)
    layers: List[nn.Module] = []
    for l, (W, b) in enumerate(unflatten(params.detach(), sizes)):
        lin = nn.Linear(sizes[l], sizes[l + 1], dtype=params.dtype, device=params.device)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        layers.append(lin)
        if l + 2 < len(sizes):
            layers.append(_ACTIVATION_MODULES[activation]())
    return nn.Sequential(*layers)
