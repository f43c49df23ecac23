"""The chunked training path, all bitwise: optimizer_step against torch.optim's SGD and Adam,
train_chunk against maml_loss + torch.optim iteration by iteration (and where it stops), and
the optimizer settings pymaml.train's fast path accepts. (pymaml.train's fast path against its
per-iteration path: test_fast_path.py.)"""

import math
import os
import subprocess
import sys

import pytest
import torch

from pymaml import fast_path as FP

from conftest import random_problem, requires_fused

pytestmark = requires_fused

ops = torch.ops.pymaml
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])

SGD = torch.optim.SGD
ADAM = torch.optim.Adam
# Every branch of the two steps: plain, momentum, dampening and weight decay, Nesterov and
# maximize; Adam's lerp weight 1 - beta1 below 0.5 (the default) and at or above it (0.5, 0.7),
# eps, L2 and decoupled weight decay, amsgrad with maximize, and zero betas.
SETTINGS = [
    (SGD, dict(lr=1e-2)),
    (SGD, dict(lr=0.3, momentum=0.9)),
    (SGD, dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=1e-2)),
    (SGD, dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True, weight_decay=1e-3)),
    (ADAM, dict(lr=1e-3)),
    (ADAM, dict(lr=1e-2, betas=(0.5, 0.9))),
    (ADAM, dict(lr=3e-3, betas=(0.3, 0.99), eps=1e-6, weight_decay=1e-2)),
    (ADAM, dict(lr=1e-3, amsgrad=True, maximize=True)),
    (ADAM, dict(lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)),
    (ADAM, dict(lr=1e-3, betas=(0.0, 0.0))),
]
SETTING_IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for cls, kw in SETTINGS]


def op_args(opt, p):
    """(state, optimizer, hyper) for the ops, from a torch.optim optimizer that has stepped."""
    spec = FP._chunk_optimizer(opt)
    assert spec is not None, "a setting the fast path should support"
    state = FP._chunk_state(opt, p, *spec)
    assert state is not None
    return state, *spec


def random_gradient(P, dtype, g):
    """Magnitudes from 1e-6 to 1e2, a few exact zeros: both branches of every rounding."""
    scale = 10.0 ** torch.randint(-6, 3, (P,), generator=g).to(dtype)
    grad = torch.randn(P, dtype=dtype, generator=g) * scale
    grad[torch.rand(P, generator=g) < 0.05] = 0
    return grad


def compare_optimizer_steps(cls, settings, dtype, P, steps, seed=0):
    """Runs torch.optim and optimizer_step side by side from the same start on the same
    gradients; asserts bitwise equal weights after every step and equal state at the end."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(P, dtype=dtype, generator=g)
    theirs, ours = start.clone().requires_grad_(), start.clone().requires_grad_()
    theirs_opt, ours_opt = cls([theirs], **settings), cls([ours], **settings)
    for k in range(steps):
        grad = random_gradient(P, dtype, g)
        theirs.grad = grad.clone()
        theirs_opt.step()
        if k == 0:  # torch.optim makes its state at its first step; the op takes it from there
            ours.grad = grad.clone()
            ours_opt.step()
        else:
            state, name, hyper = op_args(ours_opt, ours)
            with torch.no_grad():
                ops.optimizer_step(ours.detach(), state, grad, name, hyper)
        differ = (theirs != ours).nonzero().flatten()
        assert len(differ) == 0, (f"step {k + 1}: {len(differ)} of {P} weights differ, e.g. "
                                  f"[{differ[0]}] torch {theirs[differ[0]].item()!r} vs "
                                  f"op {ours[differ[0]].item()!r}")
    theirs_state, ours_state = theirs_opt.state_dict(), ours_opt.state_dict()
    assert theirs_state.keys() == ours_state.keys()
    for key, value in theirs_state["state"].get(0, {}).items():
        assert torch.equal(ours_state["state"][0][key], value), key
        assert ours_state["state"][0][key].dtype == value.dtype, key


# ---- optimizer_step: torch.optim, bitwise ------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("cls,settings", SETTINGS, ids=SETTING_IDS)
def test_optimizer_step_is_torch_optim_bitwise(cls, settings, dtype):
    # P = 7: the scalar tail of ATen's loops only; 1153 (the seed's network, not a multiple of
    # 16 or 32): vector body and tail.
    for P in (7, 1153):
        compare_optimizer_steps(cls, settings, dtype, P, steps=300)


@pytest.mark.parametrize("cls,settings", [SETTINGS[2], SETTINGS[7]], ids=[SETTING_IDS[2], SETTING_IDS[7]])
def test_optimizer_step_is_bitwise_for_large_tensors_over_threads(cls, settings):
    # Past ATen's grain size (32768) torch splits each op over threads, so scalar tails fall
    # inside the tensor, and sqrt runs in pieces.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.float32, torch.float64):
            compare_optimizer_steps(cls, settings, dtype, 70001, steps=8)
    finally:
        torch.set_num_threads(before)


def test_optimizer_step_portable_kernels_are_bitwise_too():
    # The optimizer's loops are compiled twice (portable, and AVX2+FMA where the CPU has it):
    # run the bitwise comparison with the portable ones forced, in a fresh process.
    code = ("import torch, test_train_chunk as t\n"
            "for cls, settings in t.SETTINGS:\n"
            "    for dtype in (torch.float32, torch.float64):\n"
            "        t.compare_optimizer_steps(cls, settings, dtype, 1153, steps=60)\n"
            "print('bitwise')\n")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYMAML_PORTABLE_KERNELS="1",
               PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=here, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "bitwise", out.stderr[-3000:]


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_adam_step_count_as_torch_keeps_it(default_dtype):
    # Adam counts steps in a float32 tensor (float64 when that is the default dtype); a float32
    # count stops at 2**24, and the bias corrections take the count as it is.
    before = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        g = torch.Generator().manual_seed(1)
        start = torch.randn(100, dtype=torch.float32, generator=g)
        theirs, ours = start.clone().requires_grad_(), start.clone().requires_grad_()
        theirs_opt, ours_opt = ADAM([theirs], lr=1e-3), ADAM([ours], lr=1e-3)
        for p, opt in ((theirs, theirs_opt), (ours, ours_opt)):
            p.grad = torch.ones(100, dtype=torch.float32)
            opt.step()
            opt.state[p]["step"].fill_(2.0**24 - 2)
        for _ in range(4):
            grad = random_gradient(100, torch.float32, g)
            theirs.grad = grad
            theirs_opt.step()
            with torch.no_grad():
                state, name, hyper = op_args(ours_opt, ours)
                ops.optimizer_step(ours.detach(), state, grad, name, hyper)
            assert torch.equal(ours, theirs)
        step = ours_opt.state[ours]["step"]
        assert step.dtype == default_dtype
        assert torch.equal(step, theirs_opt.state[theirs]["step"])
        assert step.item() == (2.0**24 if default_dtype == torch.float32 else 2.0**24 + 2)
    finally:
        torch.set_default_dtype(before)


# ---- train_chunk: maml_loss then torch.optim, iteration by iteration ---------------------------

def chunk_problem(seed, dtype, n):
    """A random network and inner loop, and n meta-batches [n, T, K, features]."""
    pb = random_problem(seed, dtype, max_tasks=3)
    g = torch.Generator().manual_seed(seed + 100)
    data = [(t.unsqueeze(0) + 0.3 * torch.randn((n,) + t.shape, generator=g, dtype=torch.float64).to(dtype))
            for t in pb.data]
    return pb, data


def reference_iterations(pb, data, opt, p, first, n):
    """Iterations first .. first + n - 1 the per-iteration way: maml_loss, then opt.step()."""
    losses = []
    for i in range(first, first + n):
        loss, grad = ops.maml_loss(p.detach(), *(t[i] for t in data), pb.sizes, pb.inner_lr,
                                   pb.steps, pb.activation, pb.loss, pb.first_order, True)
        losses.append(loss)
        p.grad = grad
        opt.step()
    return torch.stack(losses)


@DTYPES
@pytest.mark.parametrize("cls,settings", [SETTINGS[0], SETTINGS[3], SETTINGS[4], SETTINGS[7]],
                         ids=[SETTING_IDS[0], SETTING_IDS[3], SETTING_IDS[4], SETTING_IDS[7]])
def test_train_chunk_is_maml_loss_then_torch_optim(cls, settings, dtype):
    for seed in range(4):
        n = 9
        pb, data = chunk_problem(seed, dtype, n)
        theirs, ours = pb.params.clone().requires_grad_(), pb.params.clone().requires_grad_()
        theirs_opt, ours_opt = cls([theirs], **settings), cls([ours], **settings)
        expected = reference_iterations(pb, data, theirs_opt, theirs, 0, n)
        reference_iterations(pb, data, ours_opt, ours, 0, 1)  # torch.optim makes the state
        state, name, hyper = op_args(ours_opt, ours)
        losses, done = ops.train_chunk(ours.detach(), state, *(t[1:] for t in data), pb.sizes,
                                       pb.inner_lr, pb.steps, pb.activation, pb.loss,
                                       pb.first_order, name, hyper)
        assert done.dtype == torch.int64 and done.item() == n - 1
        assert losses.dtype == dtype and torch.equal(losses, expected[1:])
        assert torch.equal(ours, theirs)
        for key, value in theirs_opt.state[theirs].items():
            assert torch.equal(ours_opt.state[ours][key], value), key


@DTYPES
def test_train_chunk_stops_before_a_non_finite_loss(dtype):
    pb, data = chunk_problem(5, dtype, 8)
    data[3][6] = float("nan")  # y_query of meta-batch 6
    theirs, ours = pb.params.clone().requires_grad_(), pb.params.clone().requires_grad_()
    theirs_opt, ours_opt = ADAM([theirs], lr=1e-2), ADAM([ours], lr=1e-2)
    expected = reference_iterations(pb, data, theirs_opt, theirs, 0, 6)  # up to the NaN
    reference_iterations(pb, data, ours_opt, ours, 0, 1)
    state, name, hyper = op_args(ours_opt, ours)
    losses, done = ops.train_chunk(ours.detach(), state, *(t[1:] for t in data), pb.sizes,
                                   pb.inner_lr, pb.steps, pb.activation, pb.loss,
                                   pb.first_order, name, hyper)
    assert done.item() == 5  # meta-batches 1-5 done; 6 stopped it
    assert torch.equal(losses[:5], expected[1:]) and torch.isnan(losses[5:]).all()
    # the weights and the state as after meta-batch 5: no update with the NaN loss
    assert torch.equal(ours, theirs)
    for key, value in theirs_opt.state[theirs].items():
        assert torch.equal(ours_opt.state[ours][key], value), key
    assert ours_opt.state[ours]["step"].item() == 6


@DTYPES
def test_train_chunk_stops_after_an_update_that_makes_the_weights_non_finite(dtype):
    pb, data = chunk_problem(2, dtype, 4)
    pb.loss, pb.steps = "mse", 0
    data[3].fill_(1e3)  # big targets, big gradients: lr * gradient overflows
    ours = pb.params.clone()
    huge = torch.finfo(dtype).max / 10
    losses, done = ops.train_chunk(ours, [], *data, pb.sizes, pb.inner_lr, pb.steps,
                                   pb.activation, pb.loss, pb.first_order, "sgd",
                                   [huge, 0, 0, 0, 0, 0])
    assert done.item() == 0
    assert math.isfinite(losses[0].item())  # the loss was finite; its update was made
    assert not torch.isfinite(ours).all()
    assert torch.isnan(losses[1:]).all()


def test_hyper_parameters_that_overflow_the_dtype_are_refused_as_torch_refuses_them():
    # torch.optim casts each Python scalar to the tensor's dtype and raises on overflow; the
    # op does too, rather than stepping with an infinite learning rate.
    p = torch.zeros(5, requires_grad=True)
    p.grad = torch.ones(5)
    with pytest.raises(RuntimeError, match="overflow"):
        SGD([p], lr=1e39).step()
    with pytest.raises(ValueError, match="overflows float32"):
        ops.optimizer_step(p.detach(), [], torch.ones(5), "sgd", [1e39, 0, 0, 0, 0, 0])
    ops.optimizer_step(p.detach().double(), [], torch.ones(5, dtype=torch.float64), "sgd",
                       [1e39, 0, 0, 0, 0, 0])  # fine in float64


@pytest.mark.parametrize("change,match", [
    (dict(optimizer="rmsprop"), "optimizer must be 'sgd' or 'adam'"),
    (dict(hyper=[1e-2, 0, 0, 0, 0]), "optimizer 'sgd' takes optimizer_hyper"),
    (dict(hyper=[1e-2, 0, 0, 0, 0.5, 0]), "nesterov is a flag"),
    (dict(hyper=[1e-2, 0.9, 0, 0, 0, 0]), "with momentum takes optimizer_state"),
    (dict(hyper=[float("nan"), 0, 0, 0, 0, 0]), "must be finite"),
    (dict(hyper=[1e-2, 0, 0.5, 0, 1, 0], state=[]), "Nesterov momentum requires"),
    (dict(optimizer="adam", hyper=[1e-3, 0.9, 0.999, 1e-8, 0, 0, 0, 0]), "Adam takes optimizer_state"),
    (dict(optimizer="adam", hyper=[1e-3, 1.0, 0.999, 1e-8, 0, 0, 0, 0]), "betas must be in"),
    (dict(hyper=[1e-2, 0.9, 0, 0, 0, 0], state=["short"]), "momentum_buffer must be a contiguous"),
    (dict(x_support="3-d"), "x_support must be 4-D"),
    (dict(y_query="fewer"), "y_query holds 2 meta-batches, expected 3"),
])
def test_train_chunk_argument_errors(change, match):
    pb, data = chunk_problem(0, torch.float64, 3)
    P = pb.params.numel()
    state = change.get("state", [])
    state = [torch.zeros(P - 1, dtype=torch.float64) if s == "short" else s for s in state]
    xs, ys, xq, yq = data
    if change.get("x_support") == "3-d":
        xs = xs[0]
    if change.get("y_query") == "fewer":
        yq = yq[:2]
    with pytest.raises(ValueError, match=match):
        ops.train_chunk(pb.params.clone(), state, xs, ys, xq, yq, pb.sizes, pb.inner_lr, pb.steps,
                        pb.activation, pb.loss, pb.first_order, change.get("optimizer", "sgd"),
                        change.get("hyper", [1e-2, 0, 0, 0, 0, 0]))


def test_the_optimizer_check_accepts_what_the_fast_path_runs():
    # The one-time comparison with torch.optim passes for the supported settings (were it to
    # fail, training would silently be slow rather than different).
    for cls, settings in SETTINGS:
        for dtype in (torch.float32, torch.float64):
            p = torch.zeros(3, dtype=dtype, requires_grad=True)
            opt = cls([p], **settings)
            spec = FP._chunk_optimizer(opt)
            assert spec is not None
            assert FP._reproduces_torch_optim(opt, *spec, dtype)
    tensor_lr = SGD([torch.zeros(3, requires_grad=True)], lr=torch.tensor(0.1))
    assert FP._chunk_optimizer(tensor_lr) is None
    two_groups = SGD([{"params": [torch.zeros(3, requires_grad=True)]},
                      {"params": [torch.zeros(2, requires_grad=True)]}], lr=0.1)
    assert FP._chunk_optimizer(two_groups) is None
