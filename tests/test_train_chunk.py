"""The chunked training op, all bitwise: train_chunk against maml_loss + torch.optim's
SGD / Adam(fused=True) iteration by iteration (and where it stops), and which optimizers it
may step (pymaml.outer_optim). pymaml.train's fast path against its per-iteration path:
test_fast_path.py."""

import math

import pytest
import torch

from pymaml import outer_optim

from conftest import random_problem, requires_fused

pytestmark = requires_fused

ops = torch.ops.pymaml
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])

SGD = torch.optim.SGD
ADAM = torch.optim.Adam
# Every option of the two steps: plain, momentum, dampening and weight decay, Nesterov and
# maximize; Adam's betas (default, 1 - beta1 at or above 0.5, zero), eps, L2 and decoupled
# weight decay (Adam's flag and AdamW), amsgrad with maximize. All with fused=True (FUSED).
SETTINGS = [
    (SGD, dict(lr=1e-2)),
    (SGD, dict(lr=0.3, momentum=0.9)),
    (SGD, dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=1e-2)),
    (SGD, dict(lr=1e-3, momentum=0.9, nesterov=True, maximize=True, weight_decay=1e-3)),
    (ADAM, dict(lr=1e-3)),
    (ADAM, dict(lr=1e-2, betas=(0.5, 0.9))),
    (ADAM, dict(lr=3e-3, betas=(0.3, 0.99), eps=1e-6, weight_decay=1e-2)),
    (ADAM, dict(lr=1e-3, amsgrad=True, maximize=True)),
    (ADAM, dict(lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)),
    (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1, amsgrad=True)),
    (ADAM, dict(lr=1e-3, betas=(0.0, 0.0))),
]
SETTING_IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for cls, kw in SETTINGS]
FUSED = dict(fused=True)


def algorithm(pb):
    """train_chunk's algorithm for problem pb."""
    return "fomaml" if pb.first_order else "maml"


def op_args(opt, p):
    """(state, optimizer, hyper) for train_chunk, from a torch.optim optimizer that has stepped."""
    spec = outer_optim.chunk_spec(opt)
    assert spec is not None, "a setting the fast path should support"
    state = outer_optim.chunk_state(opt, p, spec)
    assert state is not None
    return state, *spec


# ---- train_chunk: maml_loss then torch.optim(fused=True), iteration by iteration ---------------

def chunk_problem(seed, dtype, n, loss=None):
    """A random network and inner loop, and n meta-batches [n, T, K, features]. loss:
    random_problem's (None: MSE or L1; "cross_entropy": one-hot targets, drawn per batch)."""
    pb = random_problem(seed, dtype, max_tasks=3, loss=loss)
    g = torch.Generator().manual_seed(seed + 100)
    data = [(t.unsqueeze(0) + 0.3 * torch.randn((n,) + t.shape, generator=g, dtype=torch.float64).to(dtype))
            for t in pb.data]
    if loss == "cross_entropy":  # the op takes class probabilities
        C = pb.sizes[-1]
        for i in (1, 3):
            labels = torch.randint(0, C, data[i - 1].shape[:-1], generator=g)
            data[i] = torch.nn.functional.one_hot(labels, C).to(dtype)
    return pb, data


def reference_iterations(pb, data, opt, p, first, n, algo=None):
    """Iterations first .. first + n - 1 the per-iteration way: maml_loss (or the reptile op),
    then opt.step(). algo: "maml", "fomaml", "reptile" or None (the problem's order)."""
    algo = algo or algorithm(pb)
    losses = []
    hyper = (pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss)
    for i in range(first, first + n):
        batch = [t[i] for t in data]
        if algo == "reptile":
            loss, grad = ops.reptile(p.detach(), *batch, *hyper)
        else:
            loss, grad = ops.maml_loss(p.detach(), *batch, *hyper, algo == "fomaml", True)
        losses.append(loss)
        p.grad = grad
        opt.step()
    return torch.stack(losses)


def chunk_iterations(pb, data, opt, p, first, n, algo=None):
    """Iterations first .. first + n - 1 in one train_chunk call: (losses, done)."""
    state, name, hyper = op_args(opt, p)
    return ops.train_chunk(p.detach(), state, *(t[first:first + n] for t in data), pb.sizes,
                           pb.inner_lr, pb.steps, pb.activation, pb.loss,
                           algo or algorithm(pb), name, hyper)


def assert_same_optimizer(ours_opt, theirs_opt):
    ours, theirs = ours_opt.state_dict(), theirs_opt.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()  # SGD without momentum: none
    for key, value in theirs["state"].get(0, {}).items():
        assert torch.equal(ours["state"][0][key], value), key
        assert ours["state"][0][key].dtype == value.dtype, key


def compare_chunks(cls, settings, dtype, seed, splits, algo=None, loss=None):
    """torch.optim(fused=True) per iteration against train_chunk over meta-batches cut at
    `splits` (the first iteration is torch.optim's in both: it makes the state). algo: the
    problem's own MAML order, or "reptile"; loss: chunk_problem's."""
    n = splits[-1]
    pb, data = chunk_problem(seed, dtype, n, loss)
    theirs, ours = pb.params.clone().requires_grad_(), pb.params.clone().requires_grad_()
    theirs_opt, ours_opt = cls([theirs], **settings, **FUSED), cls([ours], **settings, **FUSED)
    expected = reference_iterations(pb, data, theirs_opt, theirs, 0, n, algo)
    reference_iterations(pb, data, ours_opt, ours, 0, 1, algo)
    for first, end in zip([1] + splits[:-1], splits):
        losses, done = chunk_iterations(pb, data, ours_opt, ours, first, end - first, algo)
        assert done.dtype == torch.int64 and done.item() == end - first
        assert losses.dtype == dtype
        differ = (losses != expected[first:end]).nonzero().flatten()
        assert len(differ) == 0, f"iteration {first + differ[0].item()} differs first"
    assert torch.equal(ours, theirs)
    assert_same_optimizer(ours_opt, theirs_opt)


@DTYPES
@pytest.mark.parametrize("cls,settings", SETTINGS, ids=SETTING_IDS)
def test_train_chunk_is_maml_loss_then_torch_optim_fused(cls, settings, dtype):
    for seed in range(3):
        compare_chunks(cls, settings, dtype, seed, splits=[2, 9, 40, 120])


@DTYPES
@pytest.mark.parametrize("cls,settings", [SETTINGS[0], SETTINGS[3], SETTINGS[4], SETTINGS[7]],
                         ids=[SETTING_IDS[i] for i in (0, 3, 4, 7)])
def test_train_chunk_reptile_is_the_reptile_op_then_torch_optim_fused(cls, settings, dtype):
    for seed in range(3):
        compare_chunks(cls, settings, dtype, seed, splits=[2, 9, 40], algo="reptile")


@DTYPES
@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile"])
@pytest.mark.parametrize("cls,settings", [SETTINGS[1], SETTINGS[5]], ids=[SETTING_IDS[1], SETTING_IDS[5]])
def test_train_chunk_cross_entropy(cls, settings, dtype, algo):
    for seed in range(3):
        compare_chunks(cls, settings, dtype, seed, splits=[2, 9, 30], algo=algo,
                       loss="cross_entropy")


@pytest.mark.parametrize("cls,settings", [SETTINGS[3], SETTINGS[9]], ids=[SETTING_IDS[3], SETTING_IDS[9]])
def test_train_chunk_is_bitwise_over_threads(cls, settings):
    # The fused kernels split the parameters over threads: with two, each call cuts them.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.float32, torch.float64):
            compare_chunks(cls, settings, dtype, 7, splits=[5, 30])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_adam_step_count_as_fused_adam_keeps_it(default_dtype):
    # Adam(fused=True) counts steps in a float32 tensor whatever the default dtype, so the
    # count stops at 2**24; the kernel takes the count as it is.
    before = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        pb, data = chunk_problem(3, torch.float32, 5)
        theirs, ours = pb.params.clone().requires_grad_(), pb.params.clone().requires_grad_()
        theirs_opt, ours_opt = ADAM([theirs], lr=1e-3, **FUSED), ADAM([ours], lr=1e-3, **FUSED)
        for p, opt in ((theirs, theirs_opt), (ours, ours_opt)):
            reference_iterations(pb, data, opt, p, 0, 1)
            opt.state[p]["step"].fill_(2.0**24 - 2)
        reference_iterations(pb, data, theirs_opt, theirs, 1, 4)
        chunk_iterations(pb, data, ours_opt, ours, 1, 4)
        assert torch.equal(ours, theirs)
        step = ours_opt.state[ours]["step"]
        assert step.dtype == torch.float32 and step.item() == 2.0**24
        assert_same_optimizer(ours_opt, theirs_opt)
    finally:
        torch.set_default_dtype(before)


@DTYPES
def test_train_chunk_stops_before_a_non_finite_loss(dtype):
    pb, data = chunk_problem(5, dtype, 8)
    data[3][6] = float("nan")  # y_query of meta-batch 6
    theirs, ours = pb.params.clone().requires_grad_(), pb.params.clone().requires_grad_()
    theirs_opt, ours_opt = ADAM([theirs], lr=1e-2, **FUSED), ADAM([ours], lr=1e-2, **FUSED)
    expected = reference_iterations(pb, data, theirs_opt, theirs, 0, 6)  # up to the NaN
    reference_iterations(pb, data, ours_opt, ours, 0, 1)
    losses, done = chunk_iterations(pb, data, ours_opt, ours, 1, 7)
    assert done.item() == 5  # meta-batches 1-5 done; 6 stopped it
    assert torch.equal(losses[:5], expected[1:]) and torch.isnan(losses[5:]).all()
    # the weights and the state as after meta-batch 5: no update with the NaN loss
    assert torch.equal(ours, theirs)
    assert_same_optimizer(ours_opt, theirs_opt)
    assert ours_opt.state[ours]["step"].item() == 6


@DTYPES
def test_train_chunk_stops_after_an_update_that_makes_the_weights_non_finite(dtype):
    pb, data = chunk_problem(2, dtype, 4)
    pb.loss, pb.steps = "mse", 0
    data[3].fill_(1e3)  # big targets, big gradients: lr * gradient overflows
    ours = pb.params.clone()
    huge = torch.finfo(dtype).max / 10
    losses, done = ops.train_chunk(ours, [], *data, pb.sizes, pb.inner_lr, pb.steps,
                                   pb.activation, pb.loss, algorithm(pb), "sgd",
                                   [huge, 0, 0, 0, 0, 0])
    assert done.item() == 0
    assert math.isfinite(losses[0].item())  # the loss was finite; its update was made
    assert not torch.isfinite(ours).all()
    assert torch.isnan(losses[1:]).all()


@pytest.mark.parametrize("change,match", [
    (dict(optimizer="rmsprop"), "optimizer must be 'sgd' or 'adam'"),
    (dict(hyper=[1e-2, 0, 0, 0, 0]), "optimizer 'sgd' takes optimizer_hyper"),
    (dict(hyper=[1e-2, 0, 0, 0, 0.5, 0]), "nesterov is a flag"),
    (dict(hyper=[1e-2, 0.9, 0, 0, 0, 0]), "with momentum takes optimizer_state"),
    (dict(hyper=[float("nan"), 0, 0, 0, 0, 0]), "must be finite"),
    (dict(hyper=[1e-2, 0, 0.5, 0, 1, 0], state=[]), "Nesterov momentum requires"),
    (dict(optimizer="adam", hyper=[1e-3, 0.9, 0.999, 1e-8, 0, 0, 0, 0]), "Adam takes optimizer_state"),
    (dict(optimizer="adam", hyper=[1e-3, 1.0, 0.999, 1e-8, 0, 0, 0, 0]), "betas must be in"),
    # the fused kernel would read a float64 count as float32
    (dict(optimizer="adam", hyper=[1e-3, 0.9, 0.999, 1e-8, 0, 0, 0, 0], state=["f64 step"]),
     "step must be a 0-d float32 tensor"),
    (dict(hyper=[1e-2, 0.9, 0, 0, 0, 0], state=["short"]), "momentum_buffer must be a contiguous"),
    (dict(algorithm="anil"), "algorithm must be 'maml', 'fomaml' or 'reptile', got 'anil'"),
    (dict(x_support="3-d"), r"x_support must be \[n, T, K, features\]"),
    (dict(y_query="fewer"), "y_query holds 2 meta-batches, expected 3"),
])
def test_train_chunk_argument_errors(change, match):
    pb, data = chunk_problem(0, torch.float64, 3)
    P = pb.params.numel()
    state = change.get("state", [])
    if state == ["f64 step"]:
        state = [torch.tensor(1.0, dtype=torch.float64)] + [torch.zeros(P, dtype=torch.float64)] * 2
    state = [torch.zeros(P - 1, dtype=torch.float64) if s == "short" else s for s in state]
    xs, ys, xq, yq = data
    if change.get("x_support") == "3-d":
        xs = xs[0]
    if change.get("y_query") == "fewer":
        yq = yq[:2]
    with pytest.raises(ValueError, match=match):
        ops.train_chunk(pb.params.clone(), state, xs, ys, xq, yq, pb.sizes, pb.inner_lr, pb.steps,
                        pb.activation, pb.loss, change.get("algorithm", algorithm(pb)),
                        change.get("optimizer", "sgd"),
                        change.get("hyper", [1e-2, 0, 0, 0, 0, 0]))


# ---- which optimizers train_chunk steps -------------------------------------------------------

def test_the_named_optimizers_are_built_fused_unless_the_user_chooses():
    assert outer_optim.build_kwargs({}) == dict(fused=True)
    assert outer_optim.build_kwargs(dict(momentum=0.9)) == dict(fused=True, momentum=0.9)
    for choice in (dict(foreach=True), dict(fused=False), dict(differentiable=True)):
        assert outer_optim.build_kwargs(choice) == choice
    assert outer_optim.build_kwargs(dict(foreach=False)) == dict(fused=True, foreach=False)


def test_chunk_spec_accepts_exactly_the_fused_steps():
    for cls, settings in SETTINGS:
        for fused in (True, None, False):
            opt = cls([torch.zeros(3, requires_grad=True)], **settings, fused=fused)
            assert (outer_optim.chunk_spec(opt) is not None) == (fused is True)
    p = torch.zeros(3, requires_grad=True)
    tensor_lr = SGD([p], lr=torch.tensor(0.1), fused=True)
    assert outer_optim.chunk_spec(tensor_lr) is None
    two_groups = SGD([{"params": [p]}, {"params": [torch.zeros(2, requires_grad=True)]}],
                     lr=0.1, fused=True)
    assert outer_optim.chunk_spec(two_groups) is None
    scaled = ADAM([p], lr=1e-3, fused=True)  # as torch.amp.GradScaler leaves it
    scaled.grad_scale = torch.ones(())
    assert outer_optim.chunk_spec(scaled) is None
