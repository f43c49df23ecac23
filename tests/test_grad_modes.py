"""The reference backend, and everything that reaches it (backend="auto" beyond the fused op's
reach, MetaMLP.adapt, evaluate, train(backend="reference")), in every grad mode and under
torch.func.vmap: the inner loop needs gradients whatever the caller's mode, and the result
carries a graph only when the caller's mode records one."""

import contextlib

import pytest
import torch

import pymaml
from pymaml import functional as F

from conftest import requires_fused

SIZES = [2, 6, 3]
MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
         "enable_grad": torch.enable_grad}


def problem(dtype=torch.float64, steps=3, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = F.init_params(sizes, generator=g, dtype=torch.float64).to(dtype)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    data = (rand(3, 4, sizes[0]), rand(3, 4, sizes[-1]), rand(3, 5, sizes[0]), rand(3, 5, sizes[-1]))
    hyper = dict(sizes=sizes, inner_lr=0.1, steps=steps, activation="tanh", loss="mse")
    return params, data, hyper


# Calls that backend="auto" sends to the reference: steps beyond the fused op's limit, widths
# over 2048, half precision; and backend="reference" itself.
ROUTES = {
    "reference": dict(backend="reference"),
    "auto-steps": dict(backend="auto", steps=101),
    "auto-wide": dict(backend="auto", sizes=[2, 2049, 3]),
    "auto-half": dict(backend="auto", dtype=torch.bfloat16),
}


def route_problem(route):
    changes = dict(ROUTES[route])
    backend = changes.pop("backend")
    params, data, hyper = problem(dtype=changes.pop("dtype", torch.float64),
                                  sizes=changes.pop("sizes", SIZES))
    hyper.update(changes)
    return params, data, hyper, backend


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ROUTES)
def test_functional_api_in_every_grad_mode(route, mode):
    params, data, hyper, backend = route_problem(route)
    expect_loss = F.maml_loss(params, *data, **hyper, backend="reference")
    expect_adapted = F.adapt(params, *data[:2], **hyper, backend="reference")
    # steps beyond the fused op's limit: the reference, said in a warning (class 5)
    warns = pytest.warns(RuntimeWarning, match="beyond the fused op's limit") \
        if route == "auto-steps" and pymaml.fused_available() else contextlib.nullcontext()
    with MODES[mode](), warns:
        loss = F.maml_loss(params, *data, **hyper, backend=backend)
        adapted = F.adapt(params, *data[:2], **hyper, backend=backend)
    for got, want in ((loss, expect_loss), (adapted, expect_adapted)):
        assert got.grad_fn is None and not got.requires_grad  # no graph asked for, none given
        assert not got.is_inference()  # usable by autograd afterwards
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_params_that_require_grad_get_no_graph_when_none_is_asked_for(mode):
    params, data, hyper = problem()
    params.requires_grad_()
    with MODES[mode]():
        loss = F.maml_loss(params, *data, **hyper, backend="reference")
        adapted = F.adapt(params, *data[:2], **hyper, backend="reference")
    assert loss.grad_fn is None and adapted.grad_fn is None
    assert params.grad is None


def test_tensors_made_in_inference_mode_adapt_and_differentiate():
    with torch.inference_mode():
        params, data, hyper = problem()
    assert params.is_inference()
    p = params.clone().requires_grad_()  # a normal tensor, as torch asks
    F.maml_loss(p, *data, **hyper, backend="reference").backward()
    q = params.clone().requires_grad_()
    F.maml_loss(q, *(t.clone() for t in data), **hyper, backend="reference").backward()
    assert torch.equal(p.grad, q.grad) and p.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_metamlp_adapt_and_evaluate_in_every_grad_mode(mode, backend):
    model = pymaml.MetaMLP([1, 8, 1], generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64, inner_steps=2)
    x = torch.linspace(-3, 3, 5, dtype=torch.float64).unsqueeze(1)
    expect = model.adapt(x, torch.sin(x), backend=backend).params.detach()
    expect_eval = pymaml.evaluate(model, "sine", num_tasks=8, steps=[2], backend=backend).mse
    with MODES[mode]():
        adapted = model.adapt(x, torch.sin(x), backend=backend)
        got_eval = pymaml.evaluate(model, "sine", num_tasks=8, steps=[2], backend=backend).mse
    assert torch.equal(adapted.params.detach(), expect) and adapted.params.grad_fn is None
    assert got_eval == expect_eval


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_train_with_the_reference_in_every_grad_mode(mode, algorithm):
    kw = dict(algorithm=algorithm, iterations=4, meta_batch_size=2, sizes=[1, 8, 1],
              backend="reference", progress=False, log_every=0)
    expect = pymaml.train(**kw)
    with MODES[mode]():
        got = pymaml.train(**kw)
    assert torch.equal(got.losses, expect.losses)
    assert torch.equal(got.model.params, expect.model.params)
    assert not got.model.params.is_inference()


# ---- torch.func.vmap ------------------------------------------------------------------------

@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_vmap_over_maml_loss_and_adapt(backend, first_order):
    params, data, hyper = problem()
    hyper["first_order"] = first_order
    stacked = torch.stack([params, params * 0.5])
    losses = torch.func.vmap(lambda p: F.maml_loss(p, *data, **hyper, backend=backend))(stacked)
    adapted = torch.func.vmap(lambda p: F.adapt(p, *data[:2], **hyper, backend=backend))(stacked)
    for i in range(2):
        torch.testing.assert_close(losses[i], F.maml_loss(stacked[i], *data, **hyper,
                                                          backend="reference"))
        torch.testing.assert_close(adapted[i], F.adapt(stacked[i], *data[:2], **hyper,
                                                       backend="reference"))
    # over the data too: a batch of meta-batches
    two = [torch.stack([t, t.flip(0)]) for t in data]
    per = torch.func.vmap(lambda *d: F.maml_loss(params, *d, **hyper, backend=backend))(*two)
    torch.testing.assert_close(per[1], F.maml_loss(params, *(t[1] for t in two), **hyper,
                                                   backend="reference"))


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_of_the_meta_gradient(first_order):
    params, data, hyper = problem()
    hyper["first_order"] = first_order
    stacked = torch.stack([params, params * 0.5])
    grads = torch.func.vmap(torch.func.grad(lambda p: F.maml_loss(p, *data, **hyper)))(stacked)
    for i in range(2):
        p = stacked[i].clone().requires_grad_()
        F.maml_loss(p, *data, **hyper, backend="reference").backward()
        torch.testing.assert_close(grads[i], p.grad, rtol=1e-10, atol=1e-12)


def test_vmap_result_is_differentiable_by_autograd():
    params, data, hyper = problem()
    p = torch.stack([params, params * 0.5]).requires_grad_()
    torch.func.vmap(lambda q: F.maml_loss(q, *data, **hyper))(p).sum().backward()
    q = p.detach()[1].clone().requires_grad_()
    F.maml_loss(q, *data, **hyper, backend="reference").backward()
    torch.testing.assert_close(p.grad[1], q.grad, rtol=1e-10, atol=1e-12)


@requires_fused
def test_fused_under_vmap_says_what_to_do():
    params, data, hyper = problem()
    with pytest.raises(RuntimeError, match="backend='reference' or 'auto'"):
        torch.func.vmap(lambda p: F.maml_loss(p, *data, **hyper, backend="fused"))(
            torch.stack([params, params]))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_models_made_under_inference_mode_are_ordinary_modules(backend):
    model = pymaml.MetaMLP([1, 8, 1], inner_steps=2)
    x = torch.linspace(-3, 3, 5).unsqueeze(1)
    with torch.inference_mode():
        adapted = model.adapt(x, torch.sin(x), backend=backend)
        fresh = pymaml.MetaMLP([1, 8, 1])
    for m in (adapted, fresh):
        assert not m.params.is_inference()
        m(x).sum().backward()  # trainable afterwards, as any module made outside
        assert m.params.grad is not None


@pytest.mark.parametrize("loss", ["mse", "l1", "cross_entropy"])
def test_forward_mode_transforms_hessian_jvp_jacfwd(loss):
    params, data, hyper = problem()
    hyper["loss"] = loss
    if loss == "cross_entropy":  # targets as class probabilities (rows summing to 1)
        data = tuple(t.softmax(-1) if i % 2 else t for i, t in enumerate(data))
    f = lambda p: F.maml_loss(p, *data, **hyper)
    H = torch.func.hessian(f)(params)
    q = params.clone().requires_grad_()
    (g,) = torch.autograd.grad(F.maml_loss(q, *data, **hyper, backend="reference"), q,
                               create_graph=True)
    rows = [torch.autograd.grad(g[i], q, retain_graph=True)[0] for i in range(g.numel())]
    torch.testing.assert_close(H, torch.stack(rows), rtol=1e-8, atol=1e-10)
    v = torch.linspace(-1, 1, params.numel(), dtype=params.dtype)
    _, tangent = torch.func.jvp(f, (params,), (v,))
    torch.testing.assert_close(tangent, g.detach() @ v, rtol=1e-10, atol=1e-12)
    adapt = lambda p: F.adapt(p, *data[:2], **hyper)
    torch.testing.assert_close(torch.func.jacfwd(adapt)(params), torch.func.jacrev(adapt)(params),
                               rtol=1e-10, atol=1e-12)


@requires_fused
def test_autocast_does_not_lower_the_fused_op_as_the_docs_say():
    """docs/training.md "Grad modes and torch.func": under torch.autocast the fused op (and
    pymaml.MAML on it) computes in the weights' dtype, as outside; the reference follows
    autocast. (Checked by the s30-25p review, which found the docs silent on it.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    maml = pymaml.MAML(model, inner_lr=0.01, steps=2, backend="fused")
    data = [torch.randn(2, 5, 1) for _ in range(4)]
    plain = maml(*data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowered = maml(*data)
        reference = pymaml.MAML(model, inner_lr=0.01, steps=2, backend="reference")(*data)
    assert lowered.dtype == torch.float32 and torch.equal(lowered, plain)
    assert not torch.equal(reference, plain)
