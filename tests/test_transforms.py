"""Nothing dropped or obscurely refused under the other ways of differentiating: forward-mode
AD (forward_ad.make_dual) carries its tangent through maml_loss and daml_loss on every backend
("auto" sends it to the reference, "fused" refuses in one line); learned rates made under
torch.inference_mode; torch.func transforms over inner_lr, DAML's loss_params and a
pymaml.MAML module (torch.func.functional_call); torch.compile(fullgraph=True) with a tensor
inner_lr. Each is checked against plain autograd on the reference."""

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad as fwAD

import pymaml
from pymaml import functional as F

from conftest import requires_fused

SIZES = [2, 6, 3]


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = F.init_params(SIZES, generator=g, dtype=torch.float64)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    data = (rand(3, 4, 2), rand(3, 4, 3), rand(3, 5, 2), rand(3, 5, 3))
    return params, data, dict(sizes=SIZES, steps=2, activation="tanh", loss="mse")


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("wrt", ["params", "inner_lr"])
def test_forward_mode_ad_carries_the_tangent(backend, wrt):
    params, data, hyper = problem()
    lr = torch.tensor(0.1, dtype=torch.float64)
    x = params if wrt == "params" else lr
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_ = x.clone().requires_grad_()
    call = lambda p, r: F.maml_loss(p, *data, inner_lr=r, backend="reference", **hyper)
    (grad,) = torch.autograd.grad(call(x_, lr) if wrt == "params" else call(params, x_), x_)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, v)
        out = F.maml_loss(dual if wrt == "params" else params, *data,
                          inner_lr=lr if wrt == "params" else dual, backend=backend, **hyper)
        value, tangent = fwAD.unpack_dual(out)
    assert tangent is not None
    close(tangent, (grad * v).sum())
    close(value, call(params, lr))


def daml_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes, loss_sizes = [1, 8, 1], [9, 4, 2]
    params = F.init_params(sizes, generator=g, dtype=torch.float64)
    psi = F.init_params(loss_sizes, generator=g, dtype=torch.float64)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    data = (rand(2, 5, 1), rand(2, 4, 1), rand(2, 4, 1))
    return params, psi, data, dict(sizes=sizes, loss_sizes=loss_sizes, steps=2)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("wrt", ["params", "loss_params", "inner_lr"])
def test_forward_mode_ad_carries_the_tangent_through_daml(backend, wrt):
    params, psi, data, hyper = daml_problem()
    lr = torch.tensor(0.05, dtype=torch.float64)
    inputs = dict(params=params, loss_params=psi, inner_lr=lr)
    v = torch.randn(inputs[wrt].shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))

    def call(backend, **given):
        args = {**inputs, **given}
        return F.daml_loss(args["params"], args["loss_params"], *data,
                           inner_lr=args["inner_lr"], backend=backend, **hyper)
    x_ = inputs[wrt].clone().requires_grad_()
    (grad,) = torch.autograd.grad(call("reference", **{wrt: x_}), x_)
    with fwAD.dual_level():
        value, tangent = fwAD.unpack_dual(call(backend, **{wrt: fwAD.make_dual(inputs[wrt], v)}))
    assert tangent is not None
    close(tangent, (grad * v).sum())
    close(value, call("reference"))


@requires_fused
def test_forward_mode_ad_on_the_fused_backend_is_refused_in_one_line():
    params, data, hyper = problem()
    with fwAD.dual_level():
        dual = fwAD.make_dual(params, torch.ones_like(params))
        with pytest.raises(RuntimeError, match=r"backend='fused' cannot serve this call: the "
                                               r"fused op has no forward-mode AD \(jvp"):
            F.maml_loss(dual, *data, inner_lr=0.1, backend="fused", **hyper)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("adapt_layers", [None, [-1]])
def test_learned_rates_made_under_inference_mode(backend, adapt_layers):
    params, data, hyper = problem()
    expected = F.maml_loss(params, *data, inner_lr=torch.full([2, 1], 0.1, dtype=torch.float64),
                           adapt_layers=adapt_layers, backend="reference", **hyper)
    with torch.inference_mode():
        rates = torch.full([2, 1], 0.1, dtype=torch.float64)
        got = F.maml_loss(params.clone(), *data, inner_lr=rates, adapt_layers=adapt_layers,
                          backend=backend, **hyper)
    close(got, expected)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_daml_learned_rates_made_under_inference_mode(backend):
    params, psi, data, hyper = daml_problem()
    rates = lambda: torch.full([2, 1], 0.05, dtype=torch.float64)
    expected = F.daml_loss(params, psi, *data, inner_lr=rates(), backend="reference", **hyper)
    with torch.inference_mode():
        got = F.daml_loss(params.clone(), psi.clone(), *data, inner_lr=rates(),
                          backend=backend, **hyper)
    close(got, expected)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_torch_func_grad_and_vmap_over_inner_lr(backend):
    params, data, hyper = problem()
    call = lambda r: F.maml_loss(params, *data, inner_lr=r, backend=backend, **hyper)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(
        F.maml_loss(params, *data, inner_lr=lr, backend="reference", **hyper), lr)
    close(torch.func.grad(call)(lr.detach()), expected)
    rates = torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64)
    close(torch.func.vmap(call)(rates), torch.stack([call(r) for r in rates]))


def test_torch_func_grad_over_daml_loss_params():
    g = torch.Generator().manual_seed(0)
    sizes, loss_sizes = [1, 8, 1], [9, 4, 1]
    params = F.init_params(sizes, generator=g, dtype=torch.float64)
    psi = F.init_params(loss_sizes, generator=g, dtype=torch.float64)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    data = (rand(2, 5, 1), rand(2, 4, 1), rand(2, 4, 1))
    hyper = dict(sizes=sizes, loss_sizes=loss_sizes, inner_lr=0.05, steps=2)
    psi_ = psi.clone().requires_grad_()
    (expected,) = torch.autograd.grad(F.daml_loss(params, psi_, *data, backend="reference",
                                                  **hyper), psi_)
    got = torch.func.grad(lambda q: F.daml_loss(params, q, *data, **hyper))(psi)
    close(got, expected)


def test_torch_func_over_a_maml_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    maml = pymaml.MAML(model, inner_lr=0.1, steps=2)
    _, data, _ = problem()
    maml(*data).backward()
    expected = {k: p.grad for k, p in maml.named_parameters()}
    got = torch.func.grad(lambda ps: torch.func.functional_call(maml, ps, data))(
        {k: p.detach() for k, p in maml.named_parameters()})
    for k in expected:
        close(got[k], expected[k])


@requires_fused
def test_compile_fullgraph_with_a_tensor_inner_lr():
    params, data, hyper = problem()
    lr = torch.full([2, 1], 0.1, dtype=torch.float64, requires_grad=True)
    p = params.clone().requires_grad_()
    eager = F.maml_loss(p, *data, inner_lr=lr, **hyper)
    expected = torch.autograd.grad(eager, (p, lr))
    compiled = torch.compile(lambda q, r: F.maml_loss(q, *data, inner_lr=r, **hyper),
                             fullgraph=True)
    value = compiled(p, lr)
    close(value, eager)
    for a, b in zip(torch.autograd.grad(value, (p, lr)), expected):
        close(a, b)
