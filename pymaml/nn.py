"""Conversion between nn.Sequential MLPs (Linear / ReLU / Tanh) and pymaml's flat parameters."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from . import _checks, _ops, _rates, _route
from . import functional as F
from ._layout import flatten, num_params, unflatten

_ACTIVATION_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh}


def architecture(model: nn.Sequential) -> Tuple[List[nn.Linear], List[int], str]:
    """(the Linear layers, sizes, activation) of an nn.Sequential alternating plain nn.Linear
    layers and one kind of activation (ReLU or Tanh), ending with a Linear; a ValueError naming
    the first layer that does not fit, or that would compute something else than pymaml's
    network (a subclass, a hook, a layer or parameter used twice)."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    if type(model).forward is not nn.Sequential.forward:
        raise ValueError(f"model ({type(model).__name__}) has a forward of its own: pymaml.MAML "
                         "computes the plain nn.Sequential only; write the meta-loss with "
                         "pymaml.functional, or use a plain nn.Sequential")
    _check_calls("model", model)
    linears, activation, seen = [], None, set()
    for i, m in enumerate(model):
        if id(m) in seen:
            raise ValueError(f"model[{i}] is the same module as an earlier layer (tied weights): "
                             "pymaml.MAML would adapt each use on its own; give every position "
                             "its own module, or write the meta-loss with pymaml.functional")
        seen.add(id(m))
        _check_calls(f"model[{i}]", m)
        if i % 2 == 0:
            _check_linear(i, m, linears)
            linears.append(m)
            continue
        name = next((k for k, cls in _ACTIVATION_MODULES.items() if type(m) is cls), None)
        if name is None or (activation is not None and name != activation):
            raise ValueError(f"model[{i}] must be nn.ReLU or nn.Tanh (one kind throughout), got {m}")
        activation = name
    if not linears or len(model) % 2 == 0:
        raise ValueError("model must alternate Linear and activation layers and end with a Linear")
    params = [p for m in linears for p in (m.weight, m.bias)]
    if len({id(p) for p in params}) != len(params):
        raise ValueError("model shares a weight or bias between layers (tied weights): "
                         "pymaml.MAML would adapt each use on its own; untie them, or write the "
                         "meta-loss with pymaml.functional")
    sizes = [linears[0].in_features] + [m.out_features for m in linears]
    return linears, sizes, activation or "relu"


def _check_linear(i: int, m, linears) -> None:
    """model[i] must be a plain nn.Linear with bias whose inputs match the previous layer."""
    if not isinstance(m, nn.Linear) or m.bias is None:
        raise ValueError(f"model[{i}] must be an nn.Linear with bias, got {m}")
    if type(m) is not nn.Linear:
        raise ValueError(f"model[{i}] is a {type(m).__name__}, not a plain nn.Linear (a subclass "
                         "or a parametrization): pymaml.MAML computes nn.Linear's forward only; "
                         "use nn.Linear there, or write the meta-loss with pymaml.functional")
    if tuple(m.weight.shape) != (m.out_features, m.in_features) or \
            tuple(m.bias.shape) != (m.out_features,):
        raise ValueError(f"model[{i}]'s weight {list(m.weight.shape)} and bias "
                         f"{list(m.bias.shape)} do not match its in_features={m.in_features}, "
                         f"out_features={m.out_features}")
    if linears and m.in_features != linears[-1].out_features:
        raise ValueError(f"model[{i}] takes {m.in_features} inputs but the previous "
                         f"Linear gives {linears[-1].out_features}")
    first = linears[0].weight if linears else m.weight
    for name, p in (("weight", m.weight), ("bias", m.bias)):
        if (p.dtype, p.device) != (first.dtype, first.device):
            raise ValueError(f"model[{i}]'s {name} is {p.dtype} on {p.device} but model[0]'s "
                             f"weight is {first.dtype} on {first.device}: pymaml.MAML needs "
                             "every layer in one dtype on one device; call model.to(...)")


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_MODULE = nn.modules.module
_GLOBAL_HOOKS = tuple(getattr(_MODULE, "_global" + h) for h in _HOOKS if hasattr(_MODULE, "_global" + h))


def _check_calls(where: str, m: nn.Module) -> None:
    """Nothing but the class's own forward runs when `m` is called: no hook, no forward of
    its own set on the instance."""
    if "forward" in getattr(m, "__dict__", ()):
        raise ValueError(f"{where} ({type(m).__name__}) has a forward of its own (set on the "
                         "module): pymaml.MAML computes the class's forward only; remove it, "
                         "or write the meta-loss with pymaml.functional")
    for h in _HOOKS:
        if getattr(m, h, None):
            kind = h.strip("_").replace("_", " ")[:-1]
            raise ValueError(f"{where} ({type(m).__name__}) has a {kind}: pymaml.MAML runs the "
                             "fused network, not the module's calls, and would skip it; remove "
                             "the hook, or write the meta-loss with pymaml.functional")
    if any(_GLOBAL_HOOKS):
        raise ValueError("a global module hook is registered (torch.nn.modules.module."
                         "register_module_*_hook): pymaml.MAML would skip it; remove it, or write "
                         "the meta-loss with pymaml.functional")


def frozen_layers(linears) -> List[int]:
    """The indices of the Linear layers whose weight and bias are both nn.Parameters with
    requires_grad=False (tensors that torch.func.functional_call or a transform put in their
    place are the weights of that call, whatever their requires_grad); a ValueError for a
    layer frozen in part."""
    frozen = []
    for l, m in enumerate(linears):
        w, b = (not isinstance(p, nn.Parameter) or p.requires_grad for p in (m.weight, m.bias))
        if w != b:
            which = "bias" if w else "weight"
            raise ValueError(f"linear layer {l}'s {which} has requires_grad=False but its "
                             f"{'weight' if w else 'bias'} does not: pymaml.MAML freezes whole "
                             "layers only (requires_grad=False on both; or keep them trainable "
                             "and pass adapt_layers)")
        if not w:
            frozen.append(l)
    return frozen


def _state(model) -> list:
    """What the wrapper's view of the model depends on, cheap enough to take at every call
    (~4 us for three layers): the layers (and their classes) and parameters by identity (the
    wrapper holds them, so no id is reused), each parameter's requires_grad, dtype, device and
    shape, and whether any hook or forward of its own is there. (A plain loop over the
    modules' __dict__: the cheapest way to ask.)"""
    out = [any(_GLOBAL_HOOKS)]
    for m in (model, *model._modules.values()):
        out.append(type(m))
        if m is None:
            continue
        d = m.__dict__
        out.append(id(m))
        if d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] \
                or d["_backward_pre_hooks"] or "forward" in d:
            out.append(None)  # never equal to a checked state: the full checks name it
        for p in d["_parameters"].values():
            out.append(id(p))
            if p is not None:  # (.to() and .data = swap these under the same Parameter)
                out += (p.requires_grad, p.dtype, p.device, p.shape)
    return out


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
    A layer whose weight and bias (nn.Parameters) have requires_grad=False is frozen: it keeps
    its weights in the inner loop too (it drops out of adapt_layers) and gets no gradient; a
    layer frozen in part is refused.

    Each call reads the model as it is then (a layer or parameter replaced, requires_grad
    changed: a cheap identity check, the full checks when anything changed). What the fused
    network would not compute as the module does is refused in one line naming the layer: a
    subclass of nn.Linear or a forward of its own (any layer's, or the model's), a hook
    (forward, pre-forward, backward; on the model, a layer, or global), a module or parameter
    used twice (tied weights), layers of different dtypes or devices.
    """

    def __init__(self, model: nn.Sequential, *, inner_lr, steps: int, loss: str = "mse",
                 first_order: bool = False, backend: str = "auto", adapt_layers=None):
        super().__init__()
        linears, sizes, activation = architecture(model)
        dtype = linears[0].weight.dtype
        learned = isinstance(inner_lr, torch.Tensor)
        _checks.check_hyper(0.0 if learned else inner_lr, steps, activation, loss, first_order,
                            dtype)
        _checks.check_choice("backend", backend, _checks.BACKENDS)
        _rates.check_layers("adapt_layers", adapt_layers, len(linears))
        self.module = model
        # A tensor is kept as given (an nn.Parameter is registered, so the user's optimizer
        # over maml.parameters() learns it; a plain tensor gets its gradient in its .grad).
        self.inner_lr = inner_lr if learned else float(inner_lr)
        self.steps, self.loss = int(steps), loss
        self.first_order, self.backend = first_order, backend
        self.adapt_layers = None if adapt_layers is None else list(adapt_layers)
        self._view = None
        self._read_module()

    def _read_module(self) -> None:
        """Reads the model as it is now (the wrapper computes the module of each call, not a
        snapshot): a cheap identity check of its layers, parameters and hooks against the last
        reading, and the full checks when anything changed."""
        model = self._modules["module"]
        state = _state(model)
        if self._view is not None and self._view[0] == state:
            return
        linears, sizes, activation = architecture(model)
        if isinstance(self.inner_lr, torch.Tensor):
            _rates.check_tensor("inner_lr", self.inner_lr, self.steps, num_params(sizes),
                                linears[0].weight.dtype)
        layers = _rates.check_layers("adapt_layers", self.adapt_layers, len(linears))
        frozen = frozen_layers(linears)
        if frozen:  # requires_grad=False: the layer keeps its weights in the inner loop too
            layers = [l for l in (range(len(linears)) if layers is None else layers)
                      if l not in frozen]
            if not layers:
                raise ValueError("every layer pymaml.MAML would adapt has requires_grad=False: "
                                 "nothing is left to adapt; unfreeze a layer or change "
                                 "adapt_layers")
        self.sizes, self.activation, self._linears = sizes, activation, linears
        self._layers = None if layers is None else list(layers)
        # The modules and parameters are held with the state, so that no id in it is reused.
        self._view = (state, tuple(model._modules.values()), tuple(model.parameters()))

    def flat_params(self) -> torch.Tensor:
        """The model's weights in pymaml's flat layout [P], differentiable (a copy whose
        gradient autograd splits back into each parameter's .grad)."""
        self._read_module()
        parts = [t for m in self._linears for t in (m.weight, m.bias)]
        if _route.under_torch_func(parts):  # torch.func.functional_call under grad / vmap
            return flatten(parts)  # plain torch ops: the C++ autograd node has no functorch rule
        return _ops.flatten_params(parts)

    def forward(self, x_support, y_support, x_query, y_query) -> torch.Tensor:
        params = self.flat_params()
        return F.maml_loss(params, x_support, y_support, x_query, y_query,
                           sizes=self.sizes, inner_lr=self.inner_lr, steps=self.steps,
                           activation=self.activation, loss=self.loss,
                           first_order=self.first_order, adapt_layers=self._layers,
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
            params = self.flat_params()
            adapted = F.adapt(params, x, y, sizes=self.sizes,
                            inner_lr=self.inner_lr if inner_lr is None else inner_lr,
                            steps=self.steps if steps is None else steps,
                            activation=self.activation, loss=self.loss,
                            adapt_layers=self._layers, backend=self.backend)
        models = [to_sequential(p, self.sizes, self.activation) for p in adapted]
        return models[0] if one else models
