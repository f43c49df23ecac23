"""DAML (pymaml.daml): the autograd reference against an independent torch.func formulation and
gradcheck; the argument checks; backend routing; the daml-sine task family; and the fused ops
(torch.ops.pymaml.daml_loss / daml_adapt) against the reference, gradcheck and opcheck, which
skip, saying why, where this build of pymaml._C has no fused DAML ops."""

import dataclasses
import math
import random

import pytest
import torch
from torch.func import grad, grad_and_value, vmap

import pymaml
from pymaml import daml, tasks
from pymaml import functional as F
from pymaml.testing import max_relative, relative_error

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}

FUSED_SKIP = ("torch.ops.pymaml.daml_loss / daml_adapt are not in this build of pymaml._C "
              "(the fused DAML ops are not built yet, or the extension is missing): rebuild "
              "with `pip install --no-build-isolation -e .`")
requires_fused_daml = pytest.mark.skipif(not daml.fused_available(), reason=FUSED_SKIP)


# ---- random DAML problems -------------------------------------------------------------------

@dataclasses.dataclass
class Problem:
    sizes: list
    loss_sizes: list
    activation: str
    loss: str
    adapt_loss: str
    inner_lr: float
    steps: int
    params: torch.Tensor
    loss_params: torch.Tensor
    xs: torch.Tensor  # [T, K_s, n_in] or [T, steps, K_s, n_in]
    xq: torch.Tensor
    yq: torch.Tensor

    @property
    def hyper(self):
        return dict(sizes=self.sizes, loss_sizes=self.loss_sizes, inner_lr=self.inner_lr,
                    steps=self.steps, activation=self.activation, adapt_loss=self.adapt_loss)

    @property
    def loss_hyper(self):
        return dict(self.hyper, loss=self.loss)

    @property
    def data(self):
        return self.xs, self.xq, self.yq

    def to(self, dtype):
        cast = lambda t: t.to(dtype)
        return dataclasses.replace(self, params=cast(self.params),
                                   loss_params=cast(self.loss_params), xs=cast(self.xs),
                                   xq=cast(self.xq), yq=cast(self.yq))


def random_problem(seed, dtype=torch.float64, *, max_hidden=3, max_width=8, max_steps=4,
                   max_tasks=3, min_hidden=1, loss_out=1):
    """A seeded random DAML configuration: base MLP with min_hidden..max_hidden hidden layers,
    a loss MLP of 1-3 layers with loss_out outputs, every activation / loss / adapt loss, a
    shared source batch or one per step."""
    rng = random.Random(seed)
    hidden = [rng.randint(1, max_width) for _ in range(rng.randint(min_hidden, max_hidden))]
    sizes = [rng.randint(1, 3)] + hidden + [rng.randint(1, 2)]
    loss_sizes = ([daml.loss_input_width(sizes)]
                  + [rng.randint(1, max_width) for _ in range(rng.randint(0, 2))] + [loss_out])
    T, K, Q = rng.randint(1, max_tasks), rng.randint(1, 4), rng.randint(1, 4)
    steps = rng.randint(1, max_steps)
    per_step = rng.random() < 0.5
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    pb = Problem(
        sizes=sizes, loss_sizes=loss_sizes,
        activation=rng.choice(["relu", "tanh"]), loss=rng.choice(["l1", "mse"]),
        adapt_loss=rng.choice(["l1", "mse"]), inner_lr=10 ** rng.uniform(-2, -0.5), steps=steps,
        params=F.init_params(sizes, generator=g, dtype=torch.float64),
        loss_params=F.init_params(loss_sizes, generator=g, dtype=torch.float64),
        xs=rand(T, steps, K, sizes[0]) if per_step else rand(T, K, sizes[0]),
        xq=rand(T, Q, sizes[0]), yq=rand(T, Q, sizes[-1]))
    return pb.to(dtype)


# ---- an independent formulation: torch.func (grad + vmap), flat vectors ---------------------

def _layers(flat, sizes):
    """[(W [out, in], b [out]), ...] of a flat [P] vector, sliced here (not pymaml._layout)."""
    out, off = [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        W = flat[off:off + n_in * n_out].view(n_out, n_in)
        off += n_in * n_out
        out.append((W, flat[off:off + n_out]))
        off += n_out
    assert off == flat.shape[0]
    return out


def torch_func_daml(sizes, loss_sizes, inner_lr, steps, activation, loss, adapt_loss):
    """(meta_loss(theta, psi, xs, xq, yq), adapt(theta, psi, xs)) written with torch.func:
    the inner gradients by torch.func.grad on flat vectors, tasks by vmap."""
    act = torch.tanh if activation == "tanh" else torch.relu

    def base(theta, x, taps=False):
        layers = _layers(theta, sizes)
        hs = []
        for l, (W, b) in enumerate(layers):
            x = x @ W.T + b
            if l + 1 < len(layers):
                x = act(x)
                hs.append(x)
        return torch.cat([x] + hs[::-1], dim=-1) if taps else x

    def loss_net(psi, u):
        layers = _layers(psi, loss_sizes)
        for l, (W, b) in enumerate(layers):
            u = u @ W.T + b
            if l + 1 < len(layers):
                u = torch.relu(u)
        return u

    def inner(theta, psi, x):
        h = loss_net(psi, base(theta, x, taps=True))
        return h.abs().mean() if adapt_loss == "l1" else (h * h).mean()

    def adapt_one(theta, psi, xs):
        per_step = xs.dim() == 3
        for k in range(steps):
            theta = theta - inner_lr * grad(inner)(theta, psi, xs[k] if per_step else xs)
        return theta

    def task_loss(theta, psi, xs, xq, yq):
        r = base(adapt_one(theta, psi, xs), xq) - yq
        return r.abs().mean() if loss == "l1" else (r * r).mean()

    def meta_loss(theta, psi, xs, xq, yq):
        return vmap(task_loss, in_dims=(None, None, 0, 0, 0))(theta, psi, xs, xq, yq).mean()

    def adapt(theta, psi, xs):
        return vmap(adapt_one, in_dims=(None, None, 0))(theta, psi, xs)

    return meta_loss, adapt


def func_outputs(pb):
    meta_loss, adapt = torch_func_daml(pb.sizes, pb.loss_sizes, pb.inner_lr, pb.steps,
                                       pb.activation, pb.loss, pb.adapt_loss)
    (g_theta, g_psi), value = grad_and_value(meta_loss, argnums=(0, 1))(
        pb.params, pb.loss_params, *pb.data)
    return dict(loss=value, grad_params=g_theta, grad_loss_params=g_psi,
                adapted=adapt(pb.params, pb.loss_params, pb.xs))


def backend_outputs(pb, backend):
    p = pb.params.clone().requires_grad_()
    q = pb.loss_params.clone().requires_grad_()
    value = pymaml.daml_loss(p, q, *pb.data, backend=backend, **pb.loss_hyper)
    value.backward()
    with torch.no_grad():
        adapted = pymaml.daml_adapt(pb.params, pb.loss_params, pb.xs, backend=backend, **pb.hyper)
    return dict(loss=value.detach(), grad_params=p.grad, grad_loss_params=q.grad, adapted=adapted)


def assert_outputs_match(got, expected, dtype, what):
    for key in expected:
        assert got[key] is not None, f"{what}: {key} is None"
        err = relative_error(got[key], expected[key])
        assert err <= TOL[dtype], (f"{what}: {key}: max |diff| / max(1, max |ref|) = "
                                   f"{err:.3g} > {TOL[dtype]:g}")


# ---- the reference ----------------------------------------------------------------------------

@pytest.mark.parametrize("block", range(4))
def test_reference_matches_torch_func(block):
    # 4 x 8 random configurations: 1-3 hidden layers, relu / tanh, l1 / mse outer and inner
    # losses, shared and per-step source batches.
    for seed in range(block * 8, (block + 1) * 8):
        pb = random_problem(seed)
        assert_outputs_match(backend_outputs(pb, "reference"), func_outputs(pb),
                             torch.float64, f"seed {seed}, {pb.loss_hyper}")


def test_reference_matches_torch_func_linear_base_and_seed_sizes():
    # No hidden layer (u is the output alone), and the seed's 1-32-32-1 / 65-32-32-1.
    pb = random_problem(100, min_hidden=0, max_hidden=0)
    assert pb.loss_sizes[0] == pb.sizes[-1]
    assert_outputs_match(backend_outputs(pb, "reference"), func_outputs(pb), torch.float64, "linear")
    g = torch.Generator().manual_seed(1)
    sizes, loss_sizes = [1, 32, 32, 1], [65, 32, 32, 1]
    x = torch.rand(3, 9, 1, generator=g, dtype=torch.float64) * 4 * math.pi - 2 * math.pi
    pb = Problem(sizes, loss_sizes, "relu", "l1", "l1", 0.03, 5,
                 F.init_params(sizes, generator=g, dtype=torch.float64, zero_bias=True),
                 F.init_params(loss_sizes, generator=g, dtype=torch.float64, zero_bias=True),
                 x[:, 4:].reshape(3, 5, 1, 1), x[:, :4], torch.sin(x[:, :4]))
    assert_outputs_match(backend_outputs(pb, "reference"), func_outputs(pb), torch.float64, "seed")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reference_gradcheck_both_parameter_sets(seed):
    pb = random_problem(1000 + seed, max_hidden=2, max_width=4, max_steps=3, max_tasks=2)

    def f(theta, psi):
        return pymaml.daml_loss(theta, psi, *pb.data, backend="reference", **pb.loss_hyper)

    inputs = (pb.params.clone().requires_grad_(), pb.loss_params.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)

    def g(theta, psi):
        return pymaml.daml_adapt(theta, psi, pb.xs, backend="reference", **pb.hyper)

    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_loss_params_get_a_gradient_only_through_the_inner_loop():
    pb = random_problem(7)
    q = pb.loss_params.clone().requires_grad_()
    pymaml.daml_loss(pb.params, q, *pb.data, backend="reference", **pb.loss_hyper).backward()
    assert q.grad is not None and q.grad.abs().max() > 0
    # the outer loss of the adapted network is all that reads psi: the query loss at the
    # adapted parameters equals daml_loss
    adapted = pymaml.daml_adapt(pb.params, pb.loss_params, pb.xs, backend="reference", **pb.hyper)
    residual = vmap(lambda w, x: F.mlp_forward(w, x, sizes=pb.sizes, activation=pb.activation))(
        adapted, pb.xq) - pb.yq
    per_task = residual.abs().mean((1, 2)) if pb.loss == "l1" else residual.square().mean((1, 2))
    value = pymaml.daml_loss(pb.params, pb.loss_params, *pb.data, backend="reference",
                             **pb.loss_hyper)
    torch.testing.assert_close(value, per_task.mean(), rtol=1e-13, atol=1e-14)


def test_per_step_batches_read_batch_k():
    pb = random_problem(11)
    shared = pb.xs if pb.xs.dim() == 3 else pb.xs[:, 0]
    repeated = shared.unsqueeze(1).expand(-1, pb.steps, -1, -1)
    args = dict(backend="reference", **pb.loss_hyper)
    a = pymaml.daml_loss(pb.params, pb.loss_params, shared, pb.xq, pb.yq, **args)
    b = pymaml.daml_loss(pb.params, pb.loss_params, repeated, pb.xq, pb.yq, **args)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # changing only the last step's batch changes the result (it is read)
    changed = repeated.clone()
    changed[:, -1] += 1.0
    c = pymaml.daml_loss(pb.params, pb.loss_params, changed, pb.xq, pb.yq, **args)
    assert not torch.equal(b, c)


def test_reference_under_torch_func_and_grad_modes():
    pb = random_problem(5)
    args = dict(backend="reference", **pb.loss_hyper)
    p, q = pb.params.clone().requires_grad_(), pb.loss_params.clone().requires_grad_()
    pymaml.daml_loss(p, q, *pb.data, **args).backward()
    # torch.func.grad through the public API (auto routes to the reference under transforms)
    g_theta, g_psi = grad(lambda a, b: pymaml.daml_loss(a, b, *pb.data, **pb.loss_hyper),
                          argnums=(0, 1))(pb.params, pb.loss_params)
    torch.testing.assert_close(g_theta, p.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_psi, q.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        value = pymaml.daml_loss(p, q, *pb.data, **args)
    assert value.grad_fn is None and not value.requires_grad
    with torch.inference_mode():
        adapted = pymaml.daml_adapt(pb.params, pb.loss_params, pb.xs, backend="reference",
                                    **pb.hyper)
    assert adapted.shape == (pb.xs.shape[0], pb.params.shape[0])


# ---- argument checks --------------------------------------------------------------------------

def _seed_call():
    sizes, loss_sizes = [1, 4, 3, 1], [8, 5, 1]
    g = torch.Generator().manual_seed(0)
    return dict(params=F.init_params(sizes, generator=g), loss_params=F.init_params(loss_sizes, generator=g),
                x_source=torch.randn(2, 3, 2, 1, generator=g), x_query=torch.randn(2, 4, 1, generator=g),
                y_query=torch.randn(2, 4, 1, generator=g),
                sizes=sizes, loss_sizes=loss_sizes, inner_lr=0.03, steps=3)


BAD = [
    (dict(loss_sizes=[7, 5, 1]), ValueError, r"loss_sizes\[0\] must be .* 1 \+ 4 \+ 3 = 8"),
    (dict(loss_sizes=[8, 5, 0]), ValueError, "loss_sizes must hold positive integers"),
    (dict(loss_sizes=[8]), ValueError, "loss_sizes must list"),
    (dict(loss_sizes="8,1"), TypeError, "loss_sizes must be a sequence"),
    (dict(sizes=[1, 4, 0, 1]), ValueError, "sizes must hold positive integers"),
    (dict(first_order=True), ValueError, "first_order=True .* no gradient"),
    (dict(steps=0), ValueError, "steps must be >= 1 for DAML"),
    (dict(steps=2.0), TypeError, "steps must be an int"),
    (dict(inner_lr=float("nan")), ValueError, "inner_lr must be finite"),
    (dict(inner_lr="0.1"), TypeError, "inner_lr must be a real number"),
    (dict(inner_lr=torch.tensor(1)), TypeError, "inner_lr must have the dtype of params"),
    (dict(inner_lr=torch.full((3, 2), 0.1)), ValueError,
     "inner_lr as a tensor must broadcast"),
    (dict(activation="gelu"), ValueError, "activation must be one of"),
    (dict(loss="huber"), ValueError, "loss must be one of"),
    (dict(adapt_loss="l2"), ValueError, "adapt_loss must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(params=torch.zeros(5)), ValueError, "params must be \\[P\\]"),
    (dict(params=[0.0]), TypeError, "params must be a torch.Tensor"),
    (dict(loss_params=torch.zeros(3)), ValueError, "loss_params must be \\[P\\] with P = 51"),
    (dict(loss_params=torch.zeros(51, dtype=torch.float64)), TypeError, "loss_params must have the dtype"),
    (dict(loss_params=torch.zeros(51, dtype=torch.int64)), TypeError, "loss_params must be a floating-point"),
    (dict(x_source=torch.zeros(2, 4, 2, 1)), ValueError, r"x_source \[T, steps, K_s, 1\] .*\(steps = 3\)"),
    (dict(x_source=torch.zeros(2, 3, 2)), ValueError, r"x_source must be \[T, K_s, 1\]"),
    (dict(x_source=torch.zeros(2, 0, 1)), ValueError, "x_source needs at least one source point"),
    (dict(x_source=torch.zeros(3, 2, 1)), ValueError, "x_query has 2 tasks but x_source has 3"),
    (dict(x_source=torch.zeros(2, 2, 1, dtype=torch.float64)), TypeError, "x_source must have the dtype"),
    (dict(x_query=torch.zeros(2, 4, 2)), ValueError, r"x_query must be \[T, Q, 1\]"),
    (dict(y_query=torch.zeros(2, 3, 1)), ValueError, "x_query and y_query must have the same number"),
    (dict(y_query=None), TypeError, "y_query must be a torch.Tensor"),
]


# With backend="auto" and the fused ops built, a call goes straight to the op, which checks its
# arguments in C++; an error there sends it down pymaml.daml's checked path, which words it. So
# these cases also check that the op refuses every one of them.
@pytest.mark.parametrize("change,exc,match", BAD, ids=[f"{i}-{next(iter(c))}" for i, (c, _, _) in enumerate(BAD)])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_inputs_name_the_argument(change, exc, match, backend):
    call = dict(_seed_call(), backend=backend)
    call.update(change)
    with pytest.raises(exc, match=match):
        pymaml.daml_loss(**call)
    if not any(k in change for k in ("x_query", "y_query", "loss")):
        adapt_call = {k: v for k, v in call.items() if k not in ("x_query", "y_query", "loss", "first_order")}
        if "x_source" in change and change["x_source"].shape[0] == 3:
            return  # a task-count mismatch needs the query set
        if "first_order" in change:
            return  # daml_adapt has no first_order
        with pytest.raises(exc, match=match):
            pymaml.daml_adapt(**adapt_call)


def test_exports():
    assert pymaml.daml_loss is F.daml_loss is daml.daml_loss
    assert pymaml.daml_adapt is F.daml_adapt is daml.daml_adapt
    assert "daml_loss" in F.__all__ and "daml_adapt" in F.__all__


# ---- backend routing ----------------------------------------------------------------------------

@pytest.mark.skipif(daml.fused_available(), reason="the fused DAML ops are built")
def test_without_fused_ops_auto_runs_the_reference_and_fused_says_why():
    call = _seed_call()
    ref = pymaml.daml_loss(**call, backend="reference")
    torch.testing.assert_close(pymaml.daml_loss(**call), ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backend=.fused. cannot serve this call: .*pymaml._C"):
        pymaml.daml_loss(**call, backend="fused")
    adapt_call = {k: v for k, v in call.items() if k not in ("x_query", "y_query")}
    with pytest.raises(RuntimeError, match="backend=.fused. cannot serve this call: .*pymaml._C"):
        pymaml.daml_adapt(**adapt_call, backend="fused")


def test_fused_refusals_say_why():
    call = _seed_call()
    call["x_query"] = call["x_query"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="backend='fused' cannot serve this call"):
        pymaml.daml_loss(**call, backend="fused")
    # auto: the reference, with the gradient reaching the data
    pymaml.daml_loss(**call).backward()
    assert call["x_query"].grad is not None
    half = {k: (v.half() if isinstance(v, torch.Tensor) else v) for k, v in _seed_call().items()}
    with pytest.raises(RuntimeError, match="float32 and float64|pymaml._C"):
        pymaml.daml_loss(**half, backend="fused")


# ---- the daml-sine family ------------------------------------------------------------------------

def test_daml_sine_draws():
    fam = tasks.get_family("daml-sine")
    assert isinstance(fam, tasks.DAMLSine) and fam is not None
    assert tasks.get_daml_family("daml-sine").queries == 4
    tasks_, xs, xq, yq = fam.draw_daml(4000, 5, torch.Generator().manual_seed(0))
    assert xs.shape == (4000, 5, 1, 1) and xq.shape == yq.shape == (4000, 4, 1)
    b = tasks_[:, 0]
    assert set(b.unique().tolist()) == {0.0, math.pi}
    assert 0.45 < (b == 0).double().mean() < 0.55
    pos = xs[b == 0]
    neg = xs[b == math.pi]
    assert pos.min() >= math.pi / 4 and pos.max() < math.pi / 2
    assert neg.max() <= -math.pi / 4 and neg.min() > -math.pi / 2
    assert xq.min() >= -2 * math.pi and xq.max() < 2 * math.pi
    torch.testing.assert_close(yq, torch.sin(xq + b[:, None, None]))
    # a fresh source input at every step
    assert (xs[:, 1:] != xs[:, :1]).all()


def test_daml_sine_sample_phase_many_and_dtype():
    fam = tasks.DAMLSine()
    batch = fam.sample_phase(math.pi, 3, steps=5, generator=torch.Generator().manual_seed(1),
                             dtype=torch.float64)
    assert (batch.x_source < 0).all()
    torch.testing.assert_close(batch.y_query, -torch.sin(batch.x_query))
    with pytest.raises(ValueError, match="phase must be one of"):
        fam.sample_phase(1.0, steps=5, generator=torch.Generator())
    g_many, g_one = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    many = fam.sample_daml_many(4, 3, steps=5, generator=g_many)
    one = [fam.sample_daml(3, steps=5, generator=g_one) for _ in range(4)]
    for i, field in enumerate(tasks.DAMLBatch._fields):
        assert torch.equal(many[i], torch.stack([o[i] for o in one])), field
        assert many[i].dtype == torch.float32
    assert torch.equal(g_many.get_state(), g_one.get_state())
    with pytest.raises(ValueError, match="DAML family .* algorithm='daml'"):
        fam.sample(2, generator=torch.Generator())


def test_user_daml_sampler_is_checked():
    def shifted(T, steps, generator):
        x = torch.rand(T, steps + 3, 2, generator=generator, dtype=torch.float64)
        return x[:, :steps, None], x[:, steps:], x[:, steps:].sum(-1, keepdim=True)

    fam = tasks.get_daml_family(shifted)
    b = fam.sample_daml(2, steps=4, generator=torch.Generator())
    assert b.x_source.shape == (2, 4, 1, 2) and b.y_query.shape == (2, 3, 1)
    assert b.x_source.dtype == torch.float32
    bad = tasks.get_daml_family(lambda T, steps, g: (torch.zeros(T, steps + 1, 1, 1),
                                                     torch.zeros(T, 2, 1), torch.zeros(T, 2, 1)))
    with pytest.raises(ValueError, match="x_source with a batch for 4 inner steps, but steps = 3"):
        bad.sample_daml(2, steps=3, generator=torch.Generator())
    with pytest.raises(TypeError, match="MAML task family"):
        tasks.get_daml_family(tasks.SeedSine())


def test_daml_sine_batch_feeds_daml_loss():
    fam = tasks.DAMLSine()
    b = fam.sample_daml(2, steps=5, generator=torch.Generator().manual_seed(3))
    sizes, loss_sizes = [1, 32, 32, 1], [65, 32, 32, 1]
    g = torch.Generator().manual_seed(0)
    p = F.init_params(sizes, generator=g, zero_bias=True).requires_grad_()
    q = F.init_params(loss_sizes, generator=g, zero_bias=True).requires_grad_()
    pymaml.daml_loss(p, q, *b, sizes=sizes, loss_sizes=loss_sizes, inner_lr=0.03, steps=5).backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all() and q.grad.abs().max() > 0


# ---- the fused ops ---------------------------------------------------------------------------------

@requires_fused_daml
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("block", range(4))
def test_fused_matches_reference(dtype, block):
    # 4 x 25 random configurations per dtype
    for seed in range(block * 25, (block + 1) * 25):
        pb = random_problem(seed, dtype)
        assert_outputs_match(backend_outputs(pb, "fused"), backend_outputs(pb, "reference"),
                             dtype, f"seed {seed}, {pb.loss_hyper}")


@requires_fused_daml
def test_fused_seed_workload_matches_reference():
    fam = tasks.DAMLSine()
    g = torch.Generator().manual_seed(0)
    sizes, loss_sizes = [1, 32, 32, 1], [65, 32, 32, 1]
    for dtype in (torch.float64, torch.float32):
        b = fam.sample_daml(3, steps=5, generator=g, dtype=dtype)
        pb = Problem(sizes, loss_sizes, "relu", "l1", "l1", 0.03, 5,
                     F.init_params(sizes, generator=g, dtype=dtype, zero_bias=True),
                     F.init_params(loss_sizes, generator=g, dtype=dtype, zero_bias=True), *b)
        assert_outputs_match(backend_outputs(pb, "fused"), backend_outputs(pb, "reference"),
                             dtype, f"seed workload {dtype}")


@requires_fused_daml
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_gradcheck_both_parameter_sets(seed):
    pb = random_problem(2000 + seed, max_hidden=2, max_width=4, max_steps=3, max_tasks=2)

    def f(theta, psi):
        return pymaml.daml_loss(theta, psi, *pb.data, backend="fused", **pb.loss_hyper)

    inputs = (pb.params.clone().requires_grad_(), pb.loss_params.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_samples(name):
    samples = []
    for seed, dtype in ((0, torch.float64), (1, torch.float32), (2, torch.float64)):
        pb = random_problem(3000 + seed, dtype)
        hyper = (pb.sizes, pb.loss_sizes, pb.inner_lr, pb.steps, pb.activation)
        p, q = pb.params.clone().requires_grad_(), pb.loss_params.clone().requires_grad_()
        if name == "daml_loss":
            samples.append((p, q, *pb.data, *hyper, pb.loss, pb.adapt_loss, True))
            samples.append((pb.params, pb.loss_params, *pb.data, *hyper, pb.loss, pb.adapt_loss,
                            False))
            # the value form (keep_grad): the gradients stay with autograd
            samples.append((p, q, *pb.data, *hyper, pb.loss, pb.adapt_loss, True, True))
        elif name == "daml_train_chunk":  # two meta-batches, SGD (weights updated in place)
            chunk = [torch.stack([t, 0.5 * t]) for t in pb.data]
            weights = torch.cat([pb.params, pb.loss_params])
            samples.append((weights, [], *chunk, *hyper, pb.loss, pb.adapt_loss, "sgd",
                            [1e-2, 0.0, 0.0, 0.0, 0.0, 0.0]))
        else:
            samples.append((pb.params, pb.loss_params, pb.xs, *hyper, pb.adapt_loss))
    return samples


@requires_fused_daml
@pytest.mark.parametrize("name", ["daml_loss", "daml_adapt", "daml_train_chunk"])
def test_opcheck(name):
    for args in _op_samples(name):
        torch.library.opcheck(getattr(torch.ops.pymaml, name).default, args)


@requires_fused_daml
def test_fused_adapt_is_not_differentiable_and_auto_routes_around_it():
    pb = random_problem(9)
    p = pb.params.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable"):
        pymaml.daml_adapt(p, pb.loss_params, pb.xs, backend="fused", **pb.hyper)
    adapted = pymaml.daml_adapt(p, pb.loss_params, pb.xs, **pb.hyper)  # the reference
    assert adapted.requires_grad
    with torch.no_grad():
        fused = pymaml.daml_adapt(p, pb.loss_params, pb.xs, backend="fused", **pb.hyper)
    assert relative_error(fused, adapted.detach()) <= TOL[torch.float64]


@requires_fused_daml
def test_fused_under_torch_compile():
    # fullgraph: the checks and the routing trace, the op runs through its fake kernel, and the
    # backward is the op's autograd; compiled == eager
    pb = random_problem(12, torch.float32)

    def step(theta, psi):
        return pymaml.daml_loss(theta, psi, *pb.data, backend="fused", **pb.loss_hyper)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    outs = []
    for fn in (step, compiled):
        theta, psi = pb.params.clone().requires_grad_(), pb.loss_params.clone().requires_grad_()
        value = fn(theta, psi)
        value.backward()
        outs.append((value.detach(), theta.grad, psi.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a)


# ---- learned inner rates with DAML (design.md §8.1 on the composite network) ----------------

def _rates(pb, shape_index, seed):
    """Rates of one of the shapes inner_lr takes ([], [P], [steps, 1], [steps, P]), around
    the problem's rate."""
    P = pb.params.numel()
    shape = [(), (P,), (pb.steps, 1), (pb.steps, P)][shape_index]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g, dtype=torch.float64).to(pb.params.dtype)
    return pb.inner_lr * (1 + 0.3 * noise)


def _loss_and_grads(pb, rates, backend):
    leaves = [t.clone().requires_grad_() for t in (pb.params, pb.loss_params, rates)]
    hyper = dict(pb.loss_hyper, inner_lr=leaves[2])
    value = pymaml.daml_loss(leaves[0], leaves[1], *pb.data, backend=backend, **hyper)
    return (value, *torch.autograd.grad(value, leaves))


@requires_fused_daml
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_learned_rates_fused_matches_reference(dtype):
    for seed in range(40):
        pb, rates = random_problem(4000 + seed, dtype), None
        rates = _rates(pb, seed % 4, seed)
        fused, ref = _loss_and_grads(pb, rates, "fused"), _loss_and_grads(pb, rates, "reference")
        for name, a, b in zip(("loss", "params", "loss_params", "rates"), fused, ref):
            assert max_relative(a, b) <= TOL[dtype], (seed, name)


@requires_fused_daml
def test_learned_rates_gradcheck_and_opcheck():
    pb = random_problem(4100, max_hidden=2, max_width=4, max_steps=3, max_tasks=2)
    rates = _rates(pb, 3, 0)

    def f(theta, psi, r):
        return pymaml.daml_loss(theta, psi, *pb.data, backend="fused",
                                **dict(pb.loss_hyper, inner_lr=r))

    inputs = tuple(t.clone().requires_grad_() for t in (pb.params, pb.loss_params, rates))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    rows = rates.expand(pb.steps, -1).contiguous().requires_grad_()
    args = (*inputs[:2], *pb.data, pb.sizes, pb.loss_sizes, 0.0, pb.steps, pb.activation,
            pb.loss, pb.adapt_loss, True)
    for keep_grad in (False, True):  # the full form, then the value form
        torch.library.opcheck(torch.ops.pymaml.daml_loss.default, (*args, keep_grad, rows, True))
    # fixed rates: their gradient not asked for
    torch.library.opcheck(torch.ops.pymaml.daml_loss.default,
                          (*args, False, rows.detach(), False))


def test_learned_rates_adapt_and_equal_rates():
    pb = random_problem(4200)
    rates = _rates(pb, 1, 1)
    adapted = pymaml.daml_adapt(pb.params, pb.loss_params, pb.xs, **dict(pb.hyper, inner_lr=rates))
    want = daml.reference_adapt(pb.params, pb.loss_params, pb.xs,
                                **dict(pb.hyper, inner_lr=rates.expand(pb.steps, -1)))
    assert torch.equal(adapted, want)
    # a tensor holding the number everywhere is the number
    same = torch.full((pb.params.numel(),), pb.inner_lr, dtype=pb.params.dtype)
    for backend in ("reference",) + (("fused",) if daml.fused_available() else ()):
        a = pymaml.daml_loss(pb.params, pb.loss_params, *pb.data, backend=backend,
                             **dict(pb.loss_hyper, inner_lr=same))
        b = pymaml.daml_loss(pb.params, pb.loss_params, *pb.data, backend=backend,
                             **pb.loss_hyper)
        assert max_relative(a, b) <= TOL[pb.params.dtype]


@requires_fused_daml
def test_the_value_form_hands_both_gradients_over():
    # daml_loss with keep_grad: the full op's gradients, handed to both networks (autograd.cpp).
    pb = random_problem(3100, torch.float64)
    args = (*pb.data, pb.sizes, pb.loss_sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss,
            pb.adapt_loss, True)
    _, g, g_psi = torch.ops.pymaml.daml_loss(pb.params, pb.loss_params, *args)
    p, q = pb.params.clone().requires_grad_(), pb.loss_params.clone().requires_grad_()
    value = lambda p, q: torch.ops.pymaml.daml_loss(p, q, *args, True)[0]
    loss = value(p, q)
    loss.backward(torch.tensor(0.5, dtype=torch.float64), retain_graph=True)
    loss.backward()
    assert torch.equal(p.grad, 1.5 * g) and torch.equal(q.grad, 1.5 * g_psi)
    p.grad = None
    value(p, pb.loss_params).backward()  # psi not learned
    assert torch.equal(p.grad, g)
