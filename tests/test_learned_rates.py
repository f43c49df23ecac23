"""Learned inner rates (inner_lr a tensor broadcastable to [steps, P]: one rate, Meta-SGD's per
parameter, per step, per step and parameter, MAML++'s per weight / bias tensor through
per_layer_rates) and frozen layers (adapt_layers; [-1] is ANIL): the reference against the
torch.func oracle (pymaml.testing.torch_func_learned_maml, written apart from it) and the fused
op against both, on random configurations, gradients in params and in rates; gradcheck over
both together; adapt(); the argument errors.

The fused tests skip, with the reason, while backend="fused" refuses tensor rates or
adapt_layers: the file passes before the fused op serves them and checks it once it does."""

import itertools

import pytest
import torch

import pymaml
from pymaml import functional as F
from pymaml.testing import (LARGE, RATE_SHAPES, LearnedProblem, layer_choices, learned_oracle_outputs,
                            learned_outputs, max_relative, per_tensor_expand, random_learned_problem,
                            random_problem)

# max |a - b| / max(max |b|, tiny), per quantity: issue 14's bounds.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]
CONFIGS = 140  # random configurations per dtype (20 of each rate shape)


PROBE_SIZES = [2, 3, 2]  # the tiny call that asks the fused backend what it serves


def _fused_refusal(**call) -> str:
    """Why backend="fused" cannot serve a tiny call with these keywords, or "" when it can."""
    if not pymaml.fused_available():
        return "pymaml._C is not built"
    sizes = PROBE_SIZES
    p = F.init_params(sizes, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64).requires_grad_()
    x = torch.ones(2, 3, 2, dtype=torch.float64)
    try:
        F.maml_loss(p, x, x, x, x, sizes=sizes, steps=2, backend="fused", **call).backward()
    except Exception as exc:  # whatever it raises, the fused tests cannot run yet
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ""


def _fused_mark(what: str, **call):
    reason = _fused_refusal(**call)
    return pytest.mark.skipif(bool(reason), reason=f"backend='fused' does not serve {what} "
                                                   f"yet ({reason})")


requires_fused_rates = _fused_mark(
    "tensor inner_lr", inner_lr=torch.full((2, F.num_params(PROBE_SIZES)), 0.1,
                                           dtype=torch.float64, requires_grad=True))
requires_fused_layers = _fused_mark("adapt_layers", inner_lr=0.1, adapt_layers=[-1])


def compare(got: dict, expected: dict, dtype, what: str, worst: dict = None):
    """Every quantity of `expected` in `got` within TOL; the errors into `worst` (key -> max)."""
    assert got.keys() == expected.keys(), what
    for key in expected:
        assert got[key].shape == expected[key].shape, f"{what}: {key} shape"
        err = max_relative(got[key], expected[key])
        if worst is not None:
            worst[key] = max(worst.get(key, 0.0), err)
        assert err <= TOL[dtype], f"{what}: {key} differs by {err:.3g} (relative) > {TOL[dtype]:g}"


# ---- the reference against the torch.func oracle ----

@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_torch_func(dtype):
    worst = {}
    for seed in range(CONFIGS):
        lp = random_learned_problem(seed, dtype)
        compare(learned_outputs(lp, "reference"), learned_oracle_outputs(lp), dtype,
                f"seed {seed}, {lp.describe()}", worst)
    print(f"reference vs torch.func, {dtype}, {CONFIGS} configurations, worst: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_deep_wide_and_long(dtype):
    # Up to 8 layers, widths to 48, 12 inner steps: one configuration per rate shape.
    for seed in range(1000, 1007):
        lp = random_learned_problem(seed, dtype, **LARGE)
        compare(learned_outputs(lp, "reference"), learned_oracle_outputs(lp), dtype,
                f"seed {seed} (large), {lp.describe()}")


def _fixed(seed, dtype, shape, layers, first_order, steps=3) -> LearnedProblem:
    """random_problem(seed) with `steps` inner steps on a shared support batch, the order given,
    rates of `shape` (some negative) and `layers` adapting."""
    pb = random_problem(seed, dtype)
    pb.steps, pb.first_order = steps, first_order
    lp = LearnedProblem(pb, None, shape, layers)
    lp.rates = _rates_like(lp, seed)
    return lp


def _rates_like(lp: LearnedProblem, seed):
    # Fresh rates of lp.shape for lp.pb.steps, some negative.
    if lp.shape == "number":
        return lp.pb.inner_lr
    S, P, L = lp.pb.steps, lp.pb.params.numel(), len(lp.pb.sizes) - 1
    dims = {"[]": (), "[P]": (P,), "[steps,1]": (S, 1), "[1,P]": (1, P), "[steps,P]": (S, P),
            "per-layer": (S, 2 * L)}[lp.shape]
    g = torch.Generator().manual_seed(seed)
    r = (torch.rand(dims, generator=g, dtype=torch.float64) - 0.2) * 2 * lp.pb.inner_lr
    return r.to(lp.pb.params.dtype).requires_grad_()


@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
@pytest.mark.parametrize("shape", RATE_SHAPES)
def test_every_rate_shape_and_layer_choice(shape, first_order):
    # Each rate shape with each of layer_choices, 3 steps, float64: none left to chance.
    for seed in range(3):
        lp = _fixed(seed, torch.float64, shape, None, first_order)
        depth = len(lp.pb.sizes) - 1
        for layers in layer_choices(depth):
            lp.adapt_layers = layers
            compare(learned_outputs(lp, "reference"), learned_oracle_outputs(lp), torch.float64,
                    f"seed {seed}, {lp.describe()}")


@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_every_layer_subset(first_order):
    # All 15 non-empty subsets of a 4-layer net, in order and reversed with negative indices.
    pb = random_problem(3, torch.float64)
    pb.sizes, pb.steps, pb.first_order, pb.activation = [2, 5, 4, 6, 3], 2, first_order, "tanh"
    pb.params = F.init_params(pb.sizes, generator=torch.Generator().manual_seed(3),
                              dtype=torch.float64)
    T, K = pb.xs.shape[:2]
    pb.xs, pb.xq = torch.randn(2, T, K, 2, dtype=torch.float64)
    pb.ys, pb.yq = torch.randn(2, T, K, 3, dtype=torch.float64)
    rates = (torch.rand(2, pb.params.numel(), dtype=torch.float64) * 0.2).requires_grad_()
    for n in range(1, 5):
        for subset in itertools.combinations(range(4), n):
            for layers in (list(subset), [l - 4 for l in reversed(subset)]):
                lp = LearnedProblem(pb, rates, "[steps,P]", layers)
                compare(learned_outputs(lp, "reference"), learned_oracle_outputs(lp),
                        torch.float64, f"adapt_layers {layers}")


def test_auto_serves_learned_rates():
    # Whatever serves it (fused once it can, the reference until then): the same results.
    for seed in range(14):
        lp = random_learned_problem(seed, torch.float64)
        compare(learned_outputs(lp, "auto"), learned_outputs(lp, "reference"), torch.float64,
                f"seed {seed}, {lp.describe()}")


# ---- the fused op against the reference and the oracle ----

@requires_fused_rates
@requires_fused_layers
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matches_reference_and_torch_func(dtype):
    worst = {}
    for seed in range(CONFIGS):
        lp = random_learned_problem(seed, dtype)
        fused = learned_outputs(lp, "fused")
        what = f"seed {seed}, {lp.describe()}"
        compare(fused, learned_outputs(lp, "reference"), dtype, what + " (vs reference)", worst)
        compare(fused, learned_oracle_outputs(lp), dtype, what + " (vs torch.func)")
    print(f"fused vs reference, {dtype}, {CONFIGS} configurations, worst: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


@requires_fused_rates
@requires_fused_layers
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_deep_wide_and_long(dtype):
    for seed in range(1000, 1007):
        lp = random_learned_problem(seed, dtype, **LARGE)
        compare(learned_outputs(lp, "fused"), learned_outputs(lp, "reference"), dtype,
                f"seed {seed} (large), {lp.describe()}")


@requires_fused_rates
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RATE_SHAPES[1:])
def test_fused_rates_every_layer(shape, dtype):
    # Tensor rates with every layer adapting: what the fused op serves first.
    for seed in range(4):
        lp = _fixed(seed, dtype, shape, None, seed % 2 == 1)
        compare(learned_outputs(lp, "fused"), learned_outputs(lp, "reference"), dtype,
                f"seed {seed}, {lp.describe()}")


@requires_fused_layers
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_frozen_layers_plain_rate(dtype):
    for seed in range(6):
        lp = _fixed(seed, dtype, "number", None, seed % 2 == 1)
        for layers in layer_choices(len(lp.pb.sizes) - 1):
            lp.adapt_layers = layers
            compare(learned_outputs(lp, "fused"), learned_outputs(lp, "reference"), dtype,
                    f"seed {seed}, {lp.describe()}")


# ---- gradcheck over params and rates together ----

GRADCHECK_CASES = [  # (shape, adapt_layers, activation, loss) on a 2-4-3-2 net, 2 steps
    ("[P]", None, "tanh", "mse"), ("[steps,P]", [-1], "tanh", "mse"),
    ("[steps,1]", [0, 2], "relu", "mse"), ("per-layer", [1], "tanh", "l1"),
    ("[]", [0], "relu", "l1"), ("[1,P]", [2, 0], "tanh", "mse")]
BACKENDS = ["reference", pytest.param("fused", marks=[requires_fused_rates, requires_fused_layers])]


def _small(shape, layers, activation, loss) -> LearnedProblem:
    g = torch.Generator().manual_seed(11)
    sizes, T, K, S = [2, 4, 3, 2], 2, 3, 2
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    pb = random_problem(0, torch.float64)
    pb.sizes, pb.steps, pb.activation, pb.loss, pb.first_order = sizes, S, activation, loss, False
    pb.params = F.init_params(sizes, generator=g, dtype=torch.float64)
    pb.xs, pb.ys, pb.xq, pb.yq = rand(T, K, 2), rand(T, K, 2), rand(T, K, 2), rand(T, K, 2)
    pb.inner_lr = 0.3
    lp = LearnedProblem(pb, None, shape, layers)
    lp.rates = _rates_like(lp, 5)
    return lp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}")
def test_gradcheck_params_and_rates(case, backend):
    lp = _small(*case)
    hyper = lp.hyper(backend=backend)
    pb = lp.pb

    def loss(p, r):
        return F.maml_loss(p, *pb.data, inner_lr=lp.inner_lr(r), **hyper)

    def adapted(p, r):
        return F.adapt(p, pb.xs, pb.ys, inner_lr=lp.inner_lr(r), **hyper)

    inputs = (pb.params.clone().requires_grad_(), lp.rates.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(loss, inputs)
    assert torch.autograd.gradcheck(adapted, inputs)


# ---- semantics: what rates and frozen layers mean ----

def _outputs(lp, backend="reference"):
    return learned_outputs(lp, backend)


def test_tensor_rates_equal_a_number():
    # [] / [P] / [steps, P] tensors all holding one value are that number.
    lp = _fixed(0, torch.float64, "number", [0, -1], False)
    lp.rates = -0.07
    plain = _outputs(lp)
    P, S = lp.pb.params.numel(), lp.pb.steps
    for shape, dims in (("[]", ()), ("[P]", (P,)), ("[steps,P]", (S, P)), ("[steps,1]", (S, 1))):
        tensor = LearnedProblem(lp.pb, torch.full(dims, -0.07, dtype=torch.float64), shape,
                                lp.adapt_layers)
        got = _outputs(tensor)
        compare({k: got[k] for k in plain}, plain, torch.float64, shape)


def test_all_layers_listed_is_none():
    lp = _fixed(1, torch.float64, "[steps,P]", None, False)
    depth = len(lp.pb.sizes) - 1
    expected = _outputs(lp)
    for layers in (list(range(depth)), list(range(-depth, 0))[::-1]):
        lp.adapt_layers = layers
        compare(_outputs(lp), expected, torch.float64, f"adapt_layers {layers}")


def test_frozen_layers_do_not_move_and_their_rates_get_no_gradient():
    for seed in range(4):
        lp = _fixed(seed, torch.float64, "[steps,P]", [-1], seed % 2 == 1)
        out = _outputs(lp)
        body = lp.pb.params.numel() - F.num_params(lp.pb.sizes[-2:])  # all but the head
        frozen = lp.pb.params[:body]
        assert torch.equal(out["adapted"][:, :body], frozen.expand(out["adapted"].shape[0], -1))
        assert (out["grad_rates"][:, :body] == 0).all()
        assert (out["vjp_rates"][:, :body] == 0).all()
        if body:  # the meta-gradient still reaches the frozen layers
            assert out["grad_params"][:body].abs().sum() > 0


def test_freezing_equals_zero_rates_for_the_weights():
    # A frozen layer's entries with rate 0 give the same loss and params gradient; only the
    # rates' own gradient differs (a zero rate still has a gradient, a frozen entry's has none).
    lp = _fixed(2, torch.float64, "[steps,P]", None, False)
    depth = len(lp.pb.sizes) - 1
    body = lp.pb.params.numel() - F.num_params(lp.pb.sizes[-2:])  # all but the head
    zeroed = lp.rates.detach().clone()
    zeroed[:, :body] = 0
    lp.rates = zeroed.requires_grad_()
    frozen = LearnedProblem(lp.pb, lp.rates, lp.shape, [depth - 1])
    a, b = _outputs(lp), _outputs(frozen)
    for key in ("loss", "grad_params", "adapted", "vjp_params"):
        compare({key: a[key]}, {key: b[key]}, torch.float64, key)
    torch.testing.assert_close(a["grad_rates"][:, body:], b["grad_rates"][:, body:],
                               rtol=1e-12, atol=1e-14)


def test_negative_rates_ascend():
    # A negative rate is gradient ascent: one step with -a on the support set raises its loss
    # where +a lowers it (small a, a smooth net).
    lp = _small("[]", None, "tanh", "mse")
    pb = lp.pb
    loss = lambda r: F.maml_loss(pb.params, pb.xs, pb.ys, pb.xs, pb.ys, backend="reference",
                                 inner_lr=torch.tensor(r, dtype=torch.float64), **lp.hyper(steps=1))
    zero = loss(0.0)
    assert loss(-0.01) > zero > loss(0.01)


def test_per_step_rates_pick_their_step():
    # [steps, P] with only step k's row nonzero equals one step at that rate after k steps of
    # rate zero (a per-step support batch makes the steps distinguishable).
    lp = _fixed(4, torch.float64, "[steps,P]", None, False)
    S, pb = lp.pb.steps, lp.pb
    xs = torch.randn(pb.xs.shape[0], S, *pb.xs.shape[1:], dtype=torch.float64)
    ys = torch.randn(pb.ys.shape[0], S, *pb.ys.shape[1:], dtype=torch.float64)
    rates = torch.zeros(S, pb.params.numel(), dtype=torch.float64)
    rates[S - 1] = 0.05
    hyper = lp.hyper(backend="reference")
    del hyper["steps"]
    many = F.adapt(pb.params, xs, ys, inner_lr=rates, steps=S, **hyper)
    one = F.adapt(pb.params, xs[:, S - 1], ys[:, S - 1], inner_lr=0.05, steps=1, **hyper)
    torch.testing.assert_close(many, one, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", ["auto", "reference",
                                     pytest.param("fused", marks=requires_fused_rates)])
@pytest.mark.parametrize("dims", ["[0,P]", "[0,1]", "[]", "[P]"])
def test_zero_steps_move_nothing(dims, backend):
    # steps = 0: rates shaped [steps, ...] are empty; nothing moves, the rates get gradient 0.
    lp = _fixed(5, torch.float64, "[steps,P]", None, False, steps=0)
    P = lp.pb.params.numel()
    shape = {"[0,P]": (0, P), "[0,1]": (0, 1), "[]": (), "[P]": (P,)}[dims]
    lp.rates = torch.full(shape, 0.1, dtype=torch.float64, requires_grad=True)
    lp.shape = dims
    out = learned_outputs(lp, backend)
    assert torch.equal(out["adapted"], lp.pb.params.expand_as(out["adapted"]))
    assert (out["grad_rates"] == 0).all() and (out["vjp_rates"] == 0).all()


# ---- per_layer_rates ----

def test_per_layer_rates_expands_and_differentiates():
    sizes = [3, 4, 2]
    rates = torch.arange(1.0, 9.0, dtype=torch.float64).reshape(2, 4).requires_grad_()
    expanded = F.per_layer_rates(rates, sizes)
    assert expanded.shape == (2, F.num_params(sizes))
    assert torch.equal(expanded, per_tensor_expand(rates.detach(), sizes))
    (grad,) = torch.autograd.grad(expanded.sum(), rates)
    counts = torch.tensor([12.0, 4.0, 8.0, 2.0], dtype=torch.float64)  # entries per tensor
    assert torch.equal(grad, counts.expand(2, 4))
    assert F.per_layer_rates(rates[0], sizes).shape == (F.num_params(sizes),)


def test_per_layer_rates_refuses_a_wrong_width():
    with pytest.raises(ValueError, match="rates"):
        F.per_layer_rates(torch.ones(2, 5), [3, 4, 2])


# ---- argument errors, naming the argument ----

def _error_case():
    lp = _fixed(0, torch.float64, "[steps,P]", None, False)
    return lp, lp.pb.params.numel(), lp.pb.steps


ERROR_BACKENDS = ["auto", "reference",
                  pytest.param("fused", marks=[requires_fused_rates, requires_fused_layers])]


def _bad_rates(P, S):
    return {
        "[P+1]": torch.full((P + 1,), 0.1, dtype=torch.float64),
        "[steps+1,P]": torch.full((S + 1, P), 0.1, dtype=torch.float64),
        "[steps,P,1]": torch.full((S, P, 1), 0.1, dtype=torch.float64),
        "float32": torch.full((P,), 0.1, dtype=torch.float32),
        "int": torch.ones(P, dtype=torch.int64),
        "meta device": torch.full((P,), 0.1, dtype=torch.float64, device="meta"),
    }


@pytest.mark.parametrize("function", ["maml_loss", "adapt"])
@pytest.mark.parametrize("backend", ERROR_BACKENDS)
@pytest.mark.parametrize("bad", list(_bad_rates(5, 3)))
def test_bad_rates_name_inner_lr(bad, backend, function):
    lp, P, S = _error_case()
    rates = _bad_rates(P, S)[bad]
    with pytest.raises((TypeError, ValueError), match="inner_lr"):
        _call(function, lp, rates, lp.adapt_layers, backend)


BAD_LAYERS = {"out of range": lambda L: [L], "below -L": lambda L: [-L - 1],
              "twice": lambda L: [0, 0], "twice by alias": lambda L: [0, -L], "empty": lambda L: [],
              "not ints": lambda L: ["0"]}


@pytest.mark.parametrize("function", ["maml_loss", "adapt"])
@pytest.mark.parametrize("backend", ERROR_BACKENDS)
@pytest.mark.parametrize("bad", list(BAD_LAYERS))
def test_bad_adapt_layers_name_it(bad, backend, function):
    lp, P, S = _error_case()
    layers = BAD_LAYERS[bad](len(lp.pb.sizes) - 1)
    with pytest.raises((TypeError, ValueError), match="adapt_layers"):
        _call(function, lp, lp.rates, layers, backend)


def _call(function, lp, rates, layers, backend):
    pb = lp.pb
    hyper = lp.hyper(backend=backend, adapt_layers=layers)
    if function == "maml_loss":
        return F.maml_loss(pb.params, *pb.data, inner_lr=rates, **hyper)
    return F.adapt(pb.params, pb.xs, pb.ys, inner_lr=rates, **hyper)
