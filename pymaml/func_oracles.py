"""MAML, learned-rate MAML and DAML written with torch.func, independently of
pymaml.reference, pymaml.daml and pymaml's flat-layout helpers: the second oracles the
references are checked by, and the torch.func rows of the benchmarks (re-exported by
pymaml.testing)."""

import torch

from . import reference as _reference
from ._layout import unflatten

def torch_func_maml(*, sizes, inner_lr, steps, activation, loss, first_order):
    """MAML written once with torch.func, independently of pymaml.reference (the tests check the
    oracle against it; the benchmarks time it). Returns (meta_loss, adapt):
    meta_loss(params [P], xs, ys, xq, yq) -> the mean query loss after adaptation, to
    differentiate with torch.func.grad (second order, or first order: the inner gradients
    detached); adapt(params, xs, ys) -> [T, P]. Keyword arguments: a Problem's `hyper`."""
    act = _reference.ACTIVATIONS[activation]
    loss_fn = _reference.LOSSES[loss]

    def net(flat, x):  # one task's MLP on flat parameters (vmap hides the task dimension)
        layers = unflatten(flat, sizes)
        for l, (W, b) in enumerate(layers):
            x = torch.nn.functional.linear(x, W, b)
            if l + 1 < len(layers):
                x = act(x)
        return x

    def task_loss(flat, x, y):
        return loss_fn(net(flat, x), y)

    inner_grad = torch.func.grad(task_loss)

    def adapt_one(flat, xs, ys):
        for _ in range(steps):
            g = inner_grad(flat, xs, ys)
            flat = flat - inner_lr * (g.detach() if first_order else g)
        return flat

    def query_loss(flat, xs, ys, xq, yq):
        return task_loss(adapt_one(flat, xs, ys), xq, yq)

    def meta_loss(params, xs, ys, xq, yq):
        return torch.vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq).mean()

    def adapt(params, xs, ys):
        return torch.vmap(adapt_one, in_dims=(None, 0, 0))(params, xs, ys)

    return meta_loss, adapt


def _func_sequential(sizes, activation) -> torch.nn.Sequential:
    # The MLP as nn.Linear layers on the meta device (shapes and names, no numbers: building it
    # draws nothing from the global generator); torch.func.functional_call supplies the weights.
    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[activation]
    layers = []
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [act()] if l else []
        layers.append(torch.nn.Linear(n_in, n_out, device="meta"))
    return torch.nn.Sequential(*layers)


def _func_adapted_names(names, adapt_layers) -> set:
    """The parameter names of the layers that move in the inner loop (all for None); the
    oracle's own reading of the contract: indices in [-L, L), no repeats, not empty."""
    depth = len(names) // 2
    if adapt_layers is None:
        return set(names)
    layers = [l + depth if l < 0 else l for l in adapt_layers]
    if not layers or any(not 0 <= l < depth for l in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"adapt_layers {adapt_layers!r} for {depth} layers")
    return {names[2 * l + i] for l in layers for i in (0, 1)}


# The torch.func oracles' own losses and flat-to-named split, written apart from pymaml's
# (pymaml.reference.LOSSES, pymaml._layout) so that they check those too.
def _func_cross_entropy(a, y):
    """The mean over the points (rows of a [K, C]) of - sum_c y_c log softmax(a)_c, y class
    probabilities [K, C], or - log softmax(a)_y for integer class indices y [K]."""
    log_p = torch.log_softmax(a, dim=-1)
    if y.is_floating_point():
        return -(y * log_p).sum(-1).mean()
    return -log_p.gather(-1, y.unsqueeze(-1)).mean()


_FUNC_LOSSES = {"mse": lambda a, y: (a - y).square().mean(),
                "l1": lambda a, y: (a - y).abs().mean(),
                "cross_entropy": _func_cross_entropy}


def _func_split(flat, spec):
    """flat [P] -> {name: tensor of the layer's shape}, for spec [(name, shape), ...]."""
    out, off = {}, 0
    for name, shape in spec:
        n = shape.numel()
        out[name] = flat[off:off + n].reshape(shape)
        off += n
    return out


def torch_func_learned_maml(*, sizes, inner_lr, steps, activation, loss, first_order,
                            adapt_layers=None):
    """MAML with learned inner rates and frozen layers, written with torch.func
    (functional_call on an nn.Sequential, grad, vmap) independently of pymaml.reference and of
    pymaml's flat-layout helpers: the second oracle the reference is checked by.

    inner_lr: a number, or a tensor broadcastable to [steps, P] (step k updates entry p with
    rate [k, p]); adapt_layers: None (every layer) or linear layer indices: the other layers
    are not updated at all (their rates are not read). first_order treats the inner gradients
    as constants; the update still depends on the rates.

    Returns (meta_loss, adapt): meta_loss(params [P], xs, ys, xq, yq, rates=None) -> the mean
    query loss, to differentiate with torch.func.grad (argnums=(0, 5) for the rates too);
    adapt(params, xs, ys, rates=None) -> [T, P]. rates, when given, replaces inner_lr. The
    support data may be [T, steps, K, n]: a batch per inner step."""
    model = _func_sequential(sizes, activation)
    spec = [(name, p.shape) for name, p in model.named_parameters()]  # [W0, b0, W1, b1, ...]
    names = [name for name, _ in spec]
    moving_names = _func_adapted_names(names, adapt_layers)
    loss_fn = _FUNC_LOSSES[loss]

    def task_loss(moving, fixed, x, y):
        return loss_fn(torch.func.functional_call(model, {**fixed, **moving}, (x,)), y)

    inner_grad = torch.func.grad(task_loss)  # in the moving tensors only

    def adapt_one(flat, alpha, xs, ys):  # one task: flat [P], alpha [steps, P], xs [(steps,) K, n]
        tensors = _func_split(flat, spec)
        moving = {n: t for n, t in tensors.items() if n in moving_names}
        fixed = {n: t for n, t in tensors.items() if n not in moving_names}
        for k in range(steps):
            x, y = (xs[k], ys[k]) if xs.dim() == 3 else (xs, ys)
            grads, rate = inner_grad(moving, fixed, x, y), _func_split(alpha[k], spec)
            moving = {n: w - rate[n] * (grads[n].detach() if first_order else grads[n])
                      for n, w in moving.items()}
        adapted = {**fixed, **moving}
        return torch.cat([adapted[n].reshape(-1) for n in names])

    def rates_of(params, rates):
        rates = inner_lr if rates is None else rates
        shape = (steps, params.shape[-1])
        if isinstance(rates, torch.Tensor):
            return torch.broadcast_to(rates, shape)
        return params.new_full(shape, float(rates))

    def query_loss(flat, alpha, xs, ys, xq, yq):
        return task_loss(_func_split(adapt_one(flat, alpha, xs, ys), spec), {}, xq, yq)

    def meta_loss(params, xs, ys, xq, yq, rates=None):
        per_task = torch.vmap(query_loss, in_dims=(None, None, 0, 0, 0, 0))
        return per_task(params, rates_of(params, rates), xs, ys, xq, yq).mean()

    def adapt(params, xs, ys, rates=None):
        return torch.vmap(adapt_one, in_dims=(None, None, 0, 0))(params, rates_of(params, rates), xs, ys)

    return meta_loss, adapt


def torch_func_learned_grads(params, xs, ys, xq, yq, *, rates, **hyper):
    """(meta-loss, its gradient in params, in rates) by torch_func_learned_maml: rates a tensor
    broadcastable to [steps, P]; hyper the keywords of maml_loss but inner_lr and backend."""
    meta_loss, _ = torch_func_learned_maml(inner_lr=None, **hyper)
    (g_params, g_rates), value = torch.func.grad_and_value(meta_loss, argnums=(0, 5))(
        params, xs, ys, xq, yq, rates)
    return value, g_params, g_rates


def torch_func_daml(*, sizes, loss_sizes, inner_lr, steps, activation, loss, adapt_loss):
    """DAML written with torch.func (functional_call on nn.Sequential, grad, vmap),
    independently of pymaml.daml and of pymaml's flat-layout helpers: a second oracle for
    daml_loss, and the torch.func row of the benchmarks.

    The math is docs/design.md §8.3's: the loss MLP (ReLU hidden layers, linear output of any
    width) reads the base network's taps at every unlabeled source point; `steps` second-order
    SGD steps at `inner_lr` on the mean |h| or h^2; the outer loss `loss` on the query points.

    Returns (meta_loss, adapt): meta_loss(params [P], loss_params [P_psi], x_source, x_query,
    y_query, rates=None) -> the mean query loss, to differentiate with
    torch.func.grad(meta_loss, argnums=(0, 1)) (argnums=(0, 1, 5) with rates);
    adapt(params, loss_params, x_source, rates=None) -> [T, P]. x_source is [T, K_s, n_in]
    (the same inputs at every step) or [T, steps, K_s, n_in] (step k reads batch k). rates,
    learned inner rates broadcastable to [steps, P] (step k's row cut like the flat params),
    take the place of inner_lr."""
    base, loss_net = _func_sequential(sizes, activation), _func_sequential(loss_sizes, "relu")
    base_spec = [(name, p.shape) for name, p in base.named_parameters()]
    psi_spec = [(name, p.shape) for name, p in loss_net.named_parameters()]
    loss_fn = _FUNC_LOSSES[loss]
    inner_fn = {"l1": lambda h: h.abs().mean(), "mse": lambda h: h.square().mean()}[adapt_loss]
    P = sum(shape.numel() for _, shape in base_spec)

    def taps(theta, x):  # the base network layer by layer, keeping each hidden activation
        h, hidden = x, []
        for name, module in base.named_children():
            if isinstance(module, torch.nn.Linear):
                h = torch.func.functional_call(
                    module, {"weight": theta[f"{name}.weight"], "bias": theta[f"{name}.bias"]}, (h,))
            else:
                h = module(h)
                hidden.append(h)
        return torch.cat([h] + hidden[::-1], dim=-1)

    def inner_loss(theta, psi, x):
        return inner_fn(torch.func.functional_call(loss_net, psi, (taps(theta, x),)))

    inner_grad = torch.func.grad(inner_loss)  # in the base weights only

    def adapt_one(flat, psi_flat, xs, rates=None):  # one task: xs [K_s, n_in] or [steps, K_s, n_in]
        theta, psi = _func_split(flat, base_spec), _func_split(psi_flat, psi_spec)
        rows = None if rates is None else rates.expand(steps, P)
        for k in range(steps):
            grads = inner_grad(theta, psi, xs[k] if xs.dim() == 3 else xs)
            rate = ({n: inner_lr for n in theta} if rows is None
                    else _func_split(rows[k], base_spec))
            theta = {n: w - rate[n] * grads[n] for n, w in theta.items()}
        return theta

    def query_loss(flat, psi_flat, xs, xq, yq, rates=None):
        return loss_fn(torch.func.functional_call(base, adapt_one(flat, psi_flat, xs, rates),
                                                  (xq,)), yq)

    def meta_loss(params, loss_params, x_source, x_query, y_query, rates=None):
        per_task = torch.vmap(query_loss, in_dims=(None, None, 0, 0, 0, None))
        return per_task(params, loss_params, x_source, x_query, y_query, rates).mean()

    def adapt_flat(flat, psi_flat, xs, rates=None):
        adapted = adapt_one(flat, psi_flat, xs, rates)
        return torch.cat([adapted[name].reshape(-1) for name, _ in base_spec])

    def adapt(params, loss_params, x_source, rates=None):
        return torch.vmap(adapt_flat, in_dims=(None, None, 0, None))(params, loss_params,
                                                                     x_source, rates)

    return meta_loss, adapt
