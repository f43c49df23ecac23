"""The chunked training path, all bitwise: train_chunk against maml_loss + torch.optim's
SGD / Adam(fused=True) iteration by iteration (and where it stops), and pymaml.train's fast
path against its per-iteration path (losses, weights, optimizer and generator state), through
checkpoints, Ctrl-C and divergence."""

import math
import os
import signal

import pytest
import torch

import pymaml
from pymaml import outer_optim, tasks
from pymaml import trainer as T
from pymaml.trainer import TrainingDiverged

from conftest import random_problem, requires_fused

pytestmark = requires_fused

ops = torch.ops.pymaml
QUIET = dict(progress=False, log_every=0)
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


def op_args(opt, p):
    """(state, optimizer, hyper) for train_chunk, from a torch.optim optimizer that has stepped."""
    spec = outer_optim.chunk_spec(opt)
    assert spec is not None, "a setting the fast path should support"
    state = outer_optim.chunk_state(opt, p, spec)
    assert state is not None
    return state, *spec


# ---- train_chunk: maml_loss then torch.optim(fused=True), iteration by iteration ---------------

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


def chunk_iterations(pb, data, opt, p, first, n):
    """Iterations first .. first + n - 1 in one train_chunk call: (losses, done)."""
    state, name, hyper = op_args(opt, p)
    return ops.train_chunk(p.detach(), state, *(t[first:first + n] for t in data), pb.sizes,
                           pb.inner_lr, pb.steps, pb.activation, pb.loss, pb.first_order,
                           name, hyper)


def assert_same_optimizer(ours_opt, theirs_opt):
    ours, theirs = ours_opt.state_dict(), theirs_opt.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()  # SGD without momentum: none
    for key, value in theirs["state"].get(0, {}).items():
        assert torch.equal(ours["state"][0][key], value), key
        assert ours["state"][0][key].dtype == value.dtype, key


def compare_chunks(cls, settings, dtype, seed, splits):
    """torch.optim(fused=True) per iteration against train_chunk over meta-batches cut at
    `splits` (the first iteration is torch.optim's in both: it makes the state)."""
    n = splits[-1]
    pb, data = chunk_problem(seed, dtype, n)
    theirs, ours = pb.params.clone().requires_grad_(), pb.params.clone().requires_grad_()
    theirs_opt, ours_opt = cls([theirs], **settings, **FUSED), cls([ours], **settings, **FUSED)
    expected = reference_iterations(pb, data, theirs_opt, theirs, 0, n)
    reference_iterations(pb, data, ours_opt, ours, 0, 1)
    for first, end in zip([1] + splits[:-1], splits):
        losses, done = chunk_iterations(pb, data, ours_opt, ours, first, end - first)
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
                                   pb.activation, pb.loss, pb.first_order, "sgd",
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
    (dict(x_support="3-d"), "x_support must be 4-D"),
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
                        pb.activation, pb.loss, pb.first_order, change.get("optimizer", "sgd"),
                        change.get("hyper", [1e-2, 0, 0, 0, 0, 0]))


# ---- pymaml.train: the fast path against the per-iteration path --------------------------------

@pytest.fixture
def chunk_calls(monkeypatch):
    """Records the iterations of every train_chunk call the trainer makes."""
    calls = []
    real = T._train_chunk

    def spy(*args):
        calls.append(args[2].shape[0])
        return real(*args)
    monkeypatch.setattr(T, "_train_chunk", spy)
    return calls


def per_iteration(monkeypatch):
    """Makes pymaml.train take the per-iteration path (what it did before the fast path)."""
    monkeypatch.setattr(outer_optim, "chunk_spec", lambda opt: None)


def checkpoint_contents(path):
    d = torch.load(path, weights_only=True)
    return d["iteration"], d["generator"], d["optimizer"], d["losses"], d["model"]["params"]


def assert_same_checkpoint(a, b):
    (ia, ga, oa, la, pa), (ib, gb, ob, lb, pb_) = checkpoint_contents(a), checkpoint_contents(b)
    assert ia == ib and torch.equal(ga, gb) and torch.equal(la, lb) and torch.equal(pa, pb_)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for k, state in oa["state"].items():
        assert state.keys() == ob["state"][k].keys()
        for key, value in state.items():
            assert torch.equal(value, ob["state"][k][key]) and value.dtype == ob["state"][k][key].dtype


@DTYPES
@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
@pytest.mark.parametrize("optimizer,kwargs", [
    ("sgd", {}), ("sgd", dict(momentum=0.9, nesterov=True)),
    ("adam", {}), ("adam", dict(amsgrad=True, weight_decay=1e-3)),
])
def test_fast_path_is_bitwise_the_per_iteration_path(tmp_path, monkeypatch, chunk_calls, dtype,
                                                     algorithm, optimizer, kwargs):
    kw = dict(iterations=150, meta_batch_size=2, optimizer=optimizer, optimizer_kwargs=kwargs,
              outer_lr=1e-3 if optimizer == "adam" else 1e-2, algorithm=algorithm, dtype=dtype,
              checkpoint_every=60, **QUIET)
    fast = pymaml.train(checkpoint=tmp_path / "fast.ckpt", **kw)
    # the optimizers with state leave their first step to torch.optim, which makes it
    first = 0 if optimizer == "sgd" and not kwargs else 1
    assert sum(chunk_calls) == 150 - first
    per_iteration(monkeypatch)
    slow = pymaml.train(checkpoint=tmp_path / "slow.ckpt", **kw)
    assert sum(chunk_calls) == 150 - first  # no more chunks
    assert torch.equal(fast.losses, slow.losses)
    assert torch.equal(fast.model.params, slow.model.params)
    assert_same_checkpoint(tmp_path / "fast.ckpt", tmp_path / "slow.ckpt")


def test_the_seed_experiment_takes_the_fast_path_from_the_first_iteration(chunk_calls):
    run = pymaml.train(iterations=300, **QUIET)
    assert run.iterations == 300 and sum(chunk_calls) == 300


def test_chunks_never_cross_a_checkpoint_or_the_end(tmp_path, monkeypatch, chunk_calls):
    saved = []
    real_save = T._io.atomic_save
    monkeypatch.setattr(T._io, "atomic_save", lambda obj, path: (saved.append(obj["iteration"]),
                                                                 real_save(obj, path)))
    monkeypatch.setattr(T, "_CHUNK_MAX", 23)  # several chunks between checkpoints
    pymaml.train(iterations=200, checkpoint=tmp_path / "run.ckpt", checkpoint_every=37, **QUIET)
    ends = [sum(chunk_calls[:k + 1]) for k in range(len(chunk_calls))]
    assert ends[-1] == 200 and max(chunk_calls) <= 23
    for start, end in zip([0] + ends, ends):
        assert start // 37 == (end - 1) // 37, f"chunk {start + 1}..{end} crosses a checkpoint"
    assert saved == [37, 74, 111, 148, 185, 200]


def test_ctrl_c_finishes_the_chunk_checkpoints_and_resumes_bitwise(tmp_path, monkeypatch):
    calls = []
    real = T._train_chunk

    def interrupting(*args):
        calls.append(args[2].shape[0])
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C, before the chunk's work
        return real(*args)

    kw = dict(iterations=400, optimizer="adam", outer_lr=1e-3, **QUIET)
    whole = pymaml.train(**kw)
    monkeypatch.setattr(T, "_train_chunk", interrupting)
    monkeypatch.setattr(T, "_CHUNK_MAX", 50)
    ckpt = tmp_path / "run.ckpt"
    stopped = pymaml.train(checkpoint=ckpt, **kw)
    done = 1 + sum(calls)  # Adam's first step, then the three chunks, the third one whole
    assert stopped.status == "interrupted" and stopped.iterations == done < 400
    assert torch.load(ckpt, weights_only=True)["iteration"] == done
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(T, "_train_chunk", real)
    resumed = pymaml.train(checkpoint=ckpt, resume=True, **kw)
    assert resumed.status == "completed" and resumed.iterations == 400
    assert torch.equal(resumed.model.params, whole.model.params)
    assert torch.equal(resumed.losses, whole.losses)


class PoisonedSine(tasks.SeedSine):
    """seed-sine with a NaN target in the tasks of one iteration (counted over every draw,
    however many iterations a draw holds)."""

    def __init__(self, iteration, meta_batch_size):
        super().__init__()
        self.bad_row = (iteration - 1) * meta_batch_size
        self.rows = 0

    def target(self, ids, x):
        y = super().target(ids, x)
        if self.rows <= self.bad_row < self.rows + len(ids):
            y[self.bad_row - self.rows, -1, 0] = float("nan")  # a query point
        self.rows += len(ids)
        return y


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "per-iteration"])
def test_divergence_names_the_iteration_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                       chunk_calls, fast):
    if not fast:
        per_iteration(monkeypatch)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(TrainingDiverged, match="nan at iteration 27: training stopped before "
                       "updating the weights with it; the last checkpoint, .*run.ckpt, is kept") as err:
        pymaml.train(PoisonedSine(27, 2), meta_batch_size=2, iterations=100, checkpoint=ckpt,
                     checkpoint_every=10, **QUIET)
    assert err.value.iteration == 27
    assert (sum(chunk_calls) > 0) == fast
    saved = torch.load(ckpt, weights_only=True)
    assert saved["iteration"] == 20 and torch.isfinite(saved["model"]["params"]).all()


class Steep(tasks.SeedSine):
    """seed-sine scaled up: huge MSE gradients, so that lr * gradient overflows."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def target(self, ids, x):
        return self.scale * super().target(ids, x)


@pytest.mark.parametrize("dtype,scale,outer_lr", [(torch.float32, 1e10, 1e30),
                                                  (torch.float64, 1e100, 1e250)])
def test_non_finite_weights_stop_both_paths_alike(monkeypatch, chunk_calls, dtype, scale, outer_lr):
    errors = []
    for fast in (True, False):
        if not fast:
            per_iteration(monkeypatch)
        calls = len(chunk_calls)
        with pytest.raises(TrainingDiverged, match="optimizer step of iteration 1 made the "
                           "weights non-finite") as err:
            pymaml.train(Steep(scale), iterations=50, loss="mse", inner_steps=0,
                         outer_lr=outer_lr, dtype=dtype, **QUIET)
        errors.append((err.value.iteration, str(err.value)))
        assert (len(chunk_calls) > calls) == fast
    assert errors[0] == errors[1]


def test_an_overflowing_learning_rate_fails_both_paths_alike(monkeypatch, chunk_calls):
    # float32 cannot hold lr = 1e39: the fused kernel steps with an infinite rate on either
    # path (torch.optim's fused step does not refuse it), and training stops at once.
    errors = []
    for fast in (True, False):
        if not fast:
            per_iteration(monkeypatch)
        with pytest.raises(TrainingDiverged, match="optimizer step of iteration 1 made") as err:
            pymaml.train(iterations=5, outer_lr=1e39, **QUIET)
        errors.append(str(err.value))
    assert chunk_calls == [5] and errors[0] == errors[1]


class OwnSampling(tasks.SeedSine):
    """A FunctionTasks that draws its own way: it cannot promise sample_many."""

    def sample(self, T, *, generator, dtype=torch.float32, device=None):
        return super().sample(T, generator=generator, dtype=dtype, device=device)


@pytest.mark.parametrize("kwargs", [
    dict(algorithm="reptile"),
    dict(backend="reference"),
    dict(task=lambda T, g: tasks.SeedSine().sample(T, generator=g)),
    dict(task=OwnSampling()),
    dict(optimizer=torch.optim.RMSprop),
    dict(optimizer=torch.optim.Adam),
    dict(optimizer_kwargs=dict(foreach=True)),
    dict(optimizer="adam", optimizer_kwargs=dict(foreach=True)),
    dict(optimizer_kwargs=dict(fused=False)),
], ids=["reptile", "reference", "callable", "own-sampling", "rmsprop", "adam-class", "sgd-foreach",
        "adam-foreach", "sgd-unfused"])
def test_other_runs_take_the_per_iteration_path(chunk_calls, kwargs):
    run = pymaml.train(**{"iterations": 20, **QUIET, **kwargs})
    assert run.iterations == 20 and chunk_calls == []


def test_a_user_optimizer_class_built_fused_takes_the_fast_path(chunk_calls):
    run = pymaml.train(iterations=20, optimizer=torch.optim.AdamW,
                       optimizer_kwargs=dict(fused=True), **QUIET)
    assert run.iterations == 20 and sum(chunk_calls) == 19  # after torch.optim's first step


@pytest.mark.parametrize("kwargs,fused", [
    (dict(), True), (dict(optimizer="adam"), True),
    # runs that never take the fast path keep torch.optim's default step (no parallel region)
    (dict(algorithm="reptile"), None), (dict(backend="reference"), None),
    (dict(optimizer=torch.optim.SGD), None),
], ids=["sgd", "adam", "reptile", "reference", "sgd-class"])
def test_the_named_optimizers_are_fused_where_the_fast_path_may_run(tmp_path, kwargs, fused):
    path = tmp_path / "run.ckpt"
    pymaml.train(iterations=3, checkpoint=path, **QUIET, **kwargs)
    optimizer = torch.load(path, weights_only=True)["optimizer"]
    assert optimizer["param_groups"][0]["fused"] is fused
    if kwargs.get("optimizer") == "adam":
        assert optimizer["state"][0]["step"].dtype == torch.float32


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
