"""Bad input gets a clear error naming the argument, on every backend and at the raw op."""

import warnings

import pytest
import torch

import pymaml
from pymaml import functional as F

from conftest import random_problem, requires_fused

SIZES = [2, 5, 3]


def good():
    g = torch.Generator().manual_seed(0)
    p = F.init_params(SIZES, generator=g, dtype=torch.float64)
    xs, ys = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 4, 3, dtype=torch.float64)
    xq, yq = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 5, 3, dtype=torch.float64)
    return dict(params=p, x_support=xs, y_support=ys, x_query=xq, y_query=yq)


HYPER = dict(sizes=SIZES, inner_lr=0.1, steps=2)


def call(fn, backend, **changes):
    args = {**good(), **HYPER, **changes}
    if fn is F.adapt:
        args.pop("x_query"), args.pop("y_query")
    return fn(backend=backend, **args)


BAD = [
    # (changes, exception, words the message must contain)
    (dict(params=torch.zeros(4, dtype=torch.float64)), ValueError, "params"),
    (dict(params=torch.zeros(2, 33, dtype=torch.float64)), ValueError, "params"),
    (dict(params=torch.zeros(33, dtype=torch.int64)), TypeError, "params"),
    (dict(params=[0.0] * 33), TypeError, "params"),
    (dict(sizes=[2, 5, 4]), ValueError, "params"),
    (dict(sizes=[2]), ValueError, "sizes"),
    (dict(sizes=[2, 0, 3]), ValueError, "sizes"),
    (dict(sizes="2-5-3"), TypeError, "sizes"),
    (dict(x_support=torch.randn(3, 4, dtype=torch.float64)), ValueError, "x_support"),
    (dict(x_support=torch.randn(3, 4, 7, dtype=torch.float64)), ValueError, "x_support"),
    (dict(y_support=torch.randn(3, 4, 1, dtype=torch.float64)), ValueError, "y_support"),
    (dict(y_support=torch.randn(3, 2, 3, dtype=torch.float64)), ValueError, "y_support"),
    (dict(y_support=torch.randn(2, 4, 3, dtype=torch.float64)), ValueError, "y_support"),
    (dict(x_support=torch.randn(3, 0, 2, dtype=torch.float64),
          y_support=torch.randn(3, 0, 3, dtype=torch.float64)), ValueError, "x_support"),
    (dict(x_support=torch.randn(3, 4, 2, dtype=torch.float32)), TypeError, "x_support"),
    (dict(y_support=torch.ones(3, 4, 3, dtype=torch.int64)), TypeError, "y_support"),
    (dict(steps=-1), ValueError, "steps"),
    (dict(steps=2.0), TypeError, "steps"),
    (dict(inner_lr=float("nan")), ValueError, "inner_lr"),
    (dict(inner_lr=float("inf")), ValueError, "inner_lr"),
    (dict(inner_lr="0.1"), TypeError, "inner_lr"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(loss="huber"), ValueError, "loss"),
    (dict(first_order="yes"), TypeError, "first_order"),
]
BAD_QUERY = [
    (dict(x_query=torch.randn(4, 5, 2, dtype=torch.float64)), ValueError, "x_query"),
    (dict(y_query=torch.randn(3, 5, 2, dtype=torch.float64)), ValueError, "y_query"),
    (dict(x_query=torch.randn(3, 5, 2, dtype=torch.float32)), TypeError, "x_query"),
]


BACKENDS = ["auto", "reference"] + (["fused"] if pymaml.fused_available() else [])
CASES = [(F.maml_loss, *case) for case in BAD + BAD_QUERY] + [(F.adapt, *case) for case in BAD]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn,changes,exc,words", CASES,
                         ids=[f"{fn.__name__}-{w}-{i}" for i, (fn, _, _, w) in enumerate(CASES)])
def test_bad_argument(fn, backend, changes, exc, words):
    with pytest.raises(exc, match=words):
        call(fn, backend, **changes)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        call(F.maml_loss, "jax")


@requires_fused
def test_fused_refuses_what_it_cannot_do():
    with pytest.raises(RuntimeError, match="backend='fused'.*float16"):
        p = F.init_params(SIZES, dtype=torch.float16)
        F.maml_loss(p, *(t.half() for t in list(good().values())[1:]), backend="fused", **HYPER)
    with pytest.raises(RuntimeError, match="steps"):
        call(F.maml_loss, "fused", steps=101)
    with pytest.raises(RuntimeError, match="requires grad"):
        call(F.maml_loss, "fused", x_support=good()["x_support"].requires_grad_())


def test_auto_falls_back_to_the_reference_for_data_gradients():
    xs = good()["x_support"].requires_grad_()
    loss = call(F.maml_loss, "auto", x_support=xs)
    loss.backward()
    assert xs.grad is not None and xs.grad.abs().sum() > 0


@requires_fused
@pytest.mark.parametrize("args,words", [
    (lambda p, xs, ys: (p, xs, ys, [2, 5, 3], 0.1, 1, "relu", "mse", False), None),
    (lambda p, xs, ys: (p, xs, ys, [2, 5, 4], 0.1, 1, "relu", "mse", False), "params has 33"),
    (lambda p, xs, ys: (p, xs[0], ys, [2, 5, 3], 0.1, 1, "relu", "mse", False), "x_support must be 3-D"),
    (lambda p, xs, ys: (p, xs, ys.float(), [2, 5, 3], 0.1, 1, "relu", "mse", False), "y_support must have the dtype"),
    (lambda p, xs, ys: (p, xs, ys, [2, 5, 3], 0.1, -3, "relu", "mse", False), "steps must be in"),
    (lambda p, xs, ys: (p, xs, ys, [2, 5, 3], float("nan"), 1, "relu", "mse", False), "inner_lr must be finite"),
    (lambda p, xs, ys: (p, xs, ys, [2, 5, 3], 0.1, 1, "elu", "mse", False), "activation must be"),
    (lambda p, xs, ys: (p, xs, ys, [2, 5, 3], 0.1, 1, "relu", "l3", False), "loss must be"),
    (lambda p, xs, ys: (p, xs, ys, [2, 600, 3], 0.1, 1, "relu", "mse", False), "sizes"),
    (lambda p, xs, ys: (p, xs, ys, [2] * 10, 0.1, 1, "relu", "mse", False), "sizes"),
    (lambda p, xs, ys: (p.long(), xs, ys, [2, 5, 3], 0.1, 1, "relu", "mse", False), "params must be float"),
])
def test_raw_op_checks_its_arguments(args, words):
    g = good()
    a = args(g["params"], g["x_support"], g["y_support"])
    if words is None:
        assert torch.ops.pymaml.adapt(*a).shape == (3, 33)
        return
    with pytest.raises((ValueError, TypeError, RuntimeError), match=words):
        torch.ops.pymaml.adapt(*a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    pb = random_problem(11, torch.float64, max_tasks=3)
    nc = [torch.stack([t, t], -1)[..., 0] for t in pb.data]  # every stride doubled
    assert not any(t.is_contiguous() for t in nc)
    p_wide = torch.stack([pb.params, pb.params], 1)[:, 0]  # stride 2
    assert not p_wide.is_contiguous()
    expect = F.maml_loss(pb.params, *pb.data, backend="reference", **pb.hyper)
    got = F.maml_loss(p_wide, *nc, backend=backend, **pb.hyper)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    a = F.adapt(p_wide, nc[0], nc[1], backend=backend, **pb.hyper)
    torch.testing.assert_close(a, F.adapt(pb.params, pb.xs, pb.ys, backend="reference", **pb.hyper))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inner_lr_must_fit_the_dtype(backend):
    g = good()
    f32 = {k: v.float() for k, v in g.items()}
    with pytest.raises(ValueError, match="inner_lr"):
        F.maml_loss(**f32, **{**HYPER, "inner_lr": 1e300}, backend=backend)
    with pytest.raises(ValueError, match="inner_lr"):
        F.maml_loss(**g, **{**HYPER, "inner_lr": 10**400}, backend=backend)


@requires_fused
def test_raw_op_rejects_float32_overflowing_inner_lr():
    g = {k: v.float() for k, v in good().items()}
    with pytest.raises(ValueError, match="inner_lr .* overflows float32"):
        torch.ops.pymaml.adapt(g["params"], g["x_support"], g["y_support"], SIZES, 1e300, 1,
                               "relu", "mse", False)


@requires_fused
def test_nan_propagates_like_the_reference():
    # relu(NaN) is NaN in torch: a NaN in the data must not vanish in the fused op.
    for activation in ("relu", "tanh"):
        g = good()
        g["x_support"][1, 2, 0] = float("nan")
        hyper = {**HYPER, "activation": activation}
        fused = F.maml_loss(**g, **hyper, backend="fused")
        assert torch.isnan(fused) and torch.isnan(F.maml_loss(**g, **hyper, backend="reference"))
        adapted = F.adapt(g["params"], g["x_support"], g["y_support"], **hyper, backend="fused")
        assert torch.isnan(adapted[1]).any() and not torch.isnan(adapted[0]).any()


@requires_fused
def test_raw_ops_refuse_gradients_to_data():
    g = good()
    xs = g["x_support"].requires_grad_()
    p = g["params"].requires_grad_()
    hyper = (SIZES, 0.1, 2, "relu", "mse", False)
    loss, meta_grad = torch.ops.pymaml.maml_loss(p, xs, g["y_support"], g["x_query"], g["y_query"],
                                                 *hyper, True)
    assert not meta_grad.requires_grad  # an output, not a differentiable function of params
    with pytest.raises(RuntimeError, match="data tensor requires grad"):
        loss.backward()
    adapted = torch.ops.pymaml.adapt(p, xs, g["y_support"], *hyper)
    with pytest.raises(RuntimeError, match="data tensor requires grad"):
        adapted.sum().backward()


@requires_fused
def test_auto_serves_torch_func_with_the_reference():
    pb = random_problem(1, torch.float64)
    grad = torch.func.grad(lambda p: F.maml_loss(p, *pb.data, **pb.hyper))(pb.params)
    p = pb.params.clone().requires_grad_()
    F.maml_loss(p, *pb.data, backend="fused", **pb.hyper).backward()
    torch.testing.assert_close(grad, p.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda p: F.maml_loss(p, *pb.data, backend="fused", **pb.hyper))(pb.params)


# ---- devices ---------------------------------------------------------------------------------

def test_the_meta_device_is_not_supported():
    with pytest.raises(ValueError, match="device 'meta' is not supported"):
        pymaml.train(iterations=1, device="meta", progress=False, log_every=0)
    with pytest.raises(ValueError, match="device 'meta' is not supported"):
        pymaml.MetaMLP([1, 4, 1], device="meta")
    with pytest.raises(ValueError, match="the model's device 'meta' is not supported"):
        pymaml.evaluate(pymaml.MetaMLP([1, 4, 1]).to("meta"), "sine", num_tasks=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_says_so(tmp_path):
    pymaml.MetaMLP([1, 4, 1]).save(tmp_path / "m.pt")
    for call in (lambda: pymaml.load(tmp_path / "m.pt", device="cuda"),
                 lambda: pymaml.train(iterations=1, device="cuda:1", progress=False, log_every=0)):
        with pytest.raises(ValueError, match="device 'cuda(:1)?' is not usable here: this "
                                             "(torch build .* has no CUDA support|machine has 0 "
                                             "CUDA device)"):
            call()


def test_paths_must_be_paths(tmp_path):
    with pytest.raises(TypeError, match="path must be a file path"):
        pymaml.load(None)
    with pytest.raises(TypeError, match="path must be a file path"):
        pymaml.MetaMLP([1, 4, 1]).save(3)


# ---- backend="auto" beyond the fused op's limits -------------------------------------------------

@requires_fused
@pytest.mark.parametrize("fn", [F.maml_loss, F.adapt], ids=["maml_loss", "adapt"])
def test_auto_warns_when_steps_send_it_to_the_reference(fn):
    limit = pymaml._ops._C.max_steps
    with pytest.warns(RuntimeWarning, match=f"steps={limit + 1} is beyond the fused op's limit "
                                            f"of {limit}.*backend='reference'"):
        call(fn, "auto", steps=limit + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for, or within the fused op's reach: no warning
        call(fn, "reference", steps=limit + 1)
        call(fn, "auto", steps=limit)
