"""Conversion between nn.Sequential MLPs (Linear / ReLU / Tanh) and pymaml's flat parameters."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from . import _checks, _ops, _rates
from . import functional as F
from ._layout import flatten, num_params, unflatten

_ACTIVATION_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh}


def architecture(model: nn.Sequential) -> Tuple[List[nn.Linear], List[int], str]:
    """(the Linear layers, sizes, activation) of an nn.Sequential alternating Linear layers and
    one kind of activation (ReLU or Tanh), ending with a Linear; a ValueError naming the first
    layer that does not fit."""
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
    return linears, sizes, activation or "relu"


def from_sequential(model: nn.Sequential) -> Tuple[torch.Tensor, List[int], str]:
    """(params [P], sizes, activation) of an nn.Sequential alternating Linear layers and one
    kind of activation, ending with a Linear. params is a detached copy."""
    linears, sizes, activation = architecture(model)
    params = flatten([t for m in linears for t in (m.weight, m.bias)]).detach().clone()
    return params, sizes, activation


def to_sequential(params: torch.Tensor, sizes, activation: str = "relu") -> nn.Sequential:
    """An nn.Sequential holding a copy of params [P] (the inverse of from_sequential)."""

    sizes = _checks.check_sizes(sizes)
    _checks.check_params(params, sizes)
    _checks.check_choice("activation", activation, _checks.ACTIVATIONS)
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


class MAML(nn.Module):
    """The fused MAML meta-loss of an nn.Sequential MLP, in one line:

        maml = pymaml.MAML(model, inner_lr=0.01, steps=5, loss="mse")
        opt = torch.optim.Adam(model.parameters(), fused=True)
        maml(x_support, y_support, x_query, y_query).backward()  # [T, K, features] each
        opt.step()

    model: an nn.Sequential of Linear layers (with bias) alternating with one kind of
    activation (ReLU or Tanh), ending with a Linear; anything else is a ValueError naming the
    layer. Calling the wrapper returns pymaml.functional.maml_loss of the model's current
    weights (MAML, or FO-MAML with first_order=True); its .backward() leaves the meta-gradient
    in the model's own parameters' .grad. The wrapper holds no weights of its own: the model's
    parameters are the only copy (`maml.parameters()` are the model's, and inner_lr when it
    is an nn.Parameter).

    inner_lr: a number, or a tensor of the model's dtype broadcastable to [steps, P] ([],
    [P]: Meta-SGD, [steps, 1], [steps, P]); an nn.Parameter is learned with the weights:

        maml = pymaml.MAML(model, inner_lr=nn.Parameter(torch.full([P], 0.01)), steps=1)
        opt = torch.optim.Adam(maml.parameters())   # the model's weights and the rates

    adapt_layers: None (every Linear adapts in the inner loop) or the indices of the Linear
    layers that do ([-1]: the head, ANIL); the meta-gradient still reaches every layer.
    """

    def __init__(self, model: nn.Sequential, *, inner_lr, steps: int, loss: str = "mse",
                 first_order: bool = False, backend: str = "auto", adapt_layers=None):
        super().__init__()

        linears, self.sizes, self.activation = architecture(model)
        dtype = linears[0].weight.dtype
        learned = isinstance(inner_lr, torch.Tensor)
        _checks.check_hyper(0.0 if learned else inner_lr, steps, self.activation, loss, first_order,
                       dtype)
        if learned:
            _rates.check_tensor("inner_lr", inner_lr, steps, num_params(self.sizes), dtype)
        _checks.check_choice("backend", backend, _checks.BACKENDS)
        layers = _rates.check_layers("adapt_layers", adapt_layers, len(linears))
        self.module = model
        # A tensor is kept as given (an nn.Parameter is registered, so the user's optimizer
        # over maml.parameters() learns it; a plain tensor gets its gradient in its .grad).
        self.inner_lr = inner_lr if learned else float(inner_lr)
        self.steps, self.loss = int(steps), loss
        self.first_order, self.backend = first_order, backend
        self.adapt_layers = None if layers is None else list(layers)
        self._linears = linears  # a plain list: the modules are registered under self.module

    def flat_params(self) -> torch.Tensor:
        """The model's weights in pymaml's flat layout [P], differentiable (a copy whose
        gradient autograd splits back into each parameter's .grad)."""
        return _ops.flatten_params([t for m in self._linears for t in (m.weight, m.bias)])

    def forward(self, x_support, y_support, x_query, y_query) -> torch.Tensor:

        return F.maml_loss(self.flat_params(), x_support, y_support, x_query, y_query,
                         sizes=self.sizes, inner_lr=self.inner_lr, steps=self.steps,
                         activation=self.activation, loss=self.loss,
                         first_order=self.first_order, adapt_layers=self.adapt_layers,
                         backend=self.backend)

    def adapt(self, x: torch.Tensor, y: torch.Tensor, *, steps=None, inner_lr=None):
        """Test-time adaptation: the model after `steps` SGD steps (default: the wrapper's) on
        x [K, n_in], y [K, n_out], as a new nn.Sequential; for x [T, K, n_in], a list of T.
        The wrapper's inner_lr (a tensor of its rates too) and adapt_layers apply.
        The copies are detached (for gradients through adaptation, use
        pymaml.functional.adapt)."""

        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            raise ValueError("x must be [K, n_in] (one task) or [T, K, n_in] (T tasks), got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        one = x.dim() == 2
        if one and isinstance(y, torch.Tensor):
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        with torch.no_grad():
            adapted = F.adapt(self.flat_params(), x, y, sizes=self.sizes,
                            inner_lr=self.inner_lr if inner_lr is None else inner_lr,
                            steps=self.steps if steps is None else steps,
                            activation=self.activation, loss=self.loss,
                            adapt_layers=self.adapt_layers, backend=self.backend)
        models = [to_sequential(p, self.sizes, self.activation) for p in adapted]
        return models[0] if one else models
