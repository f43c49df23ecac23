"""pymaml.train's chunked fast path (pymaml.fast_path) against its per-iteration path, through
the public API only: the losses, the weights, the optimizer and generator state are bitwise the
same, through checkpoints, Ctrl-C and divergence. A run's TrainResult.fast_iterations says how
many iterations took the fast path; a user's own optimizer class always runs per iteration,
which gives the per-iteration path of the same optimizer."""

import os
import signal

import pytest
import torch

import pymaml
from pymaml import checkpoint, config, fast_path, tasks
from pymaml.trainer import TrainingDiverged

from conftest import requires_fused

pytestmark = requires_fused

QUIET = dict(progress=False, log_every=0)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])


def own_class(optimizer: str) -> type:
    """pymaml.train's "sgd" / "adam" as a user's own subclass: built with fused=True, the same
    steps, per iteration."""
    base = config.OPTIMIZERS[optimizer]
    return type(f"Own{base.__name__}", (base,), {})


class CountedSine(tasks.SeedSine):
    """seed-sine that records the length of every chunk drawn (sample_many), and can send
    SIGINT, as a user's Ctrl-C, at the start of one chunk."""

    def __init__(self, interrupt_at_chunk=None):
        super().__init__()
        self.chunks = []
        self.interrupt_at_chunk = interrupt_at_chunk

    def sample_many(self, n, T, **kw):
        self.chunks.append(n)
        if len(self.chunks) == self.interrupt_at_chunk:
            os.kill(os.getpid(), signal.SIGINT)
        return super().sample_many(n, T, **kw)


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
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "reptile-minibatches"])
@pytest.mark.parametrize("optimizer,kwargs", [
    ("sgd", {}), ("sgd", dict(momentum=0.9, nesterov=True)),
    ("adam", {}), ("adam", dict(amsgrad=True, weight_decay=1e-3)),
])
def test_fast_path_is_bitwise_the_per_iteration_path(tmp_path, dtype, algorithm, optimizer,
                                                     kwargs):
    kw = dict(iterations=150, meta_batch_size=2, optimizer_kwargs=kwargs,
              outer_lr=1e-3 if optimizer == "adam" else 1e-2, algorithm=algorithm.split("-")[0],
              dtype=dtype, checkpoint_every=60, **QUIET)
    if algorithm == "reptile-minibatches":  # 3 points a step, cycling through 8
        kw["inner_batch"] = 3
    fast = pymaml.train(checkpoint=tmp_path / "fast.ckpt", optimizer=optimizer, **kw)
    # the optimizers with state leave their first step to torch.optim, which makes it
    first = 0 if optimizer == "sgd" and not kwargs else 1
    assert fast.fast_iterations == 150 - first
    kw["optimizer_kwargs"] = dict(kwargs, fused=True)
    slow = pymaml.train(checkpoint=tmp_path / "slow.ckpt", optimizer=own_class(optimizer), **kw)
    assert slow.fast_iterations == 0
    assert torch.equal(fast.losses, slow.losses)
    assert torch.equal(fast.model.params, slow.model.params)
    assert_same_checkpoint(tmp_path / "fast.ckpt", tmp_path / "slow.ckpt")


def test_the_seed_experiment_takes_the_fast_path_from_the_first_iteration():
    run = pymaml.train(iterations=300, **QUIET)
    assert run.iterations == 300 and run.fast_iterations == 300


def test_chunks_never_cross_a_checkpoint_or_the_end(tmp_path, monkeypatch):
    saved = []
    real_save = checkpoint.Checkpoints.save
    monkeypatch.setattr(checkpoint.Checkpoints, "save", lambda self, state, write=True: (
        saved.append(state["iteration"]), real_save(self, state, write)))
    monkeypatch.setattr(fast_path, "CHUNK_MAX", 23)  # several chunks between checkpoints
    family = CountedSine()
    run = pymaml.train(family, iterations=200, checkpoint=tmp_path / "run.ckpt",
                       checkpoint_every=37, **QUIET)
    chunks = family.chunks
    ends = [sum(chunks[:k + 1]) for k in range(len(chunks))]
    assert ends[-1] == 200 == run.fast_iterations and max(chunks) <= 23
    for start, end in zip([0] + ends, ends):
        assert start // 37 == (end - 1) // 37, f"chunk {start + 1}..{end} crosses a checkpoint"
    assert saved == [37, 74, 111, 148, 185, 200]


def test_ctrl_c_finishes_the_chunk_checkpoints_and_resumes_bitwise(tmp_path, monkeypatch):
    kw = dict(iterations=400, optimizer="adam", outer_lr=1e-3, **QUIET)
    whole = pymaml.train(**kw)
    monkeypatch.setattr(fast_path, "CHUNK_MAX", 50)
    ckpt = tmp_path / "run.ckpt"
    family = CountedSine(interrupt_at_chunk=3)
    stopped = pymaml.train(family, checkpoint=ckpt, **kw)
    done = 1 + sum(family.chunks)  # Adam's first step, then the three chunks, the third one whole
    assert len(family.chunks) == 3
    assert stopped.status == "interrupted" and stopped.iterations == done < 400
    assert torch.load(ckpt, weights_only=True)["iteration"] == done
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = pymaml.train(checkpoint=ckpt, resume=True, **kw)
    assert resumed.status == "completed" and resumed.iterations == 400
    assert resumed.fast_iterations == 400 - done
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
def test_divergence_names_the_iteration_and_keeps_the_last_checkpoint(tmp_path, fast):
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(TrainingDiverged, match="nan at iteration 27: training stopped before "
                       "updating the weights with it; the last checkpoint, .*run.ckpt, is kept") as err:
        pymaml.train(PoisonedSine(27, 2), meta_batch_size=2, iterations=100, checkpoint=ckpt,
                     checkpoint_every=10, optimizer="sgd" if fast else own_class("sgd"), **QUIET)
    assert err.value.iteration == 27
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
def test_non_finite_weights_stop_both_paths_alike(dtype, scale, outer_lr):
    errors = []
    for optimizer in ("sgd", own_class("sgd")):
        with pytest.raises(TrainingDiverged, match="optimizer step of iteration 1 made the "
                           "weights non-finite") as err:
            pymaml.train(Steep(scale), iterations=50, loss="mse", inner_steps=0,
                         optimizer=optimizer, outer_lr=outer_lr, dtype=dtype, **QUIET)
        errors.append((err.value.iteration, str(err.value)))
    assert errors[0] == errors[1]


def test_an_overflowing_learning_rate_fails_both_paths_alike():
    # float32 cannot hold lr = 1e39: the fused kernel steps with an infinite rate on either
    # path (torch.optim's fused step does not refuse it), and training stops at once.
    errors = []
    for optimizer in ("sgd", own_class("sgd")):
        with pytest.raises(TrainingDiverged, match="optimizer step of iteration 1 made") as err:
            pymaml.train(iterations=5, optimizer=optimizer, optimizer_kwargs=dict(fused=True),
                         outer_lr=1e39, **QUIET)
        errors.append(str(err.value))
    assert errors[0] == errors[1]


class OwnSampling(tasks.SeedSine):
    """A FunctionTasks that draws its own way: it cannot promise sample_many."""

    def sample(self, T, *, generator, dtype=torch.float32, device=None):
        return super().sample(T, generator=generator, dtype=dtype, device=device)


@pytest.mark.parametrize("kwargs", [
    dict(backend="reference"),
    dict(task=lambda T, g: tasks.SeedSine().sample(T, generator=g)),
    dict(task=OwnSampling()),
    dict(optimizer=torch.optim.RMSprop),
    dict(optimizer=torch.optim.Adam),
    dict(optimizer=own_class("sgd"), optimizer_kwargs=dict(fused=True)),
    dict(optimizer_kwargs=dict(foreach=True)),
    dict(optimizer="adam", optimizer_kwargs=dict(foreach=True)),
    dict(optimizer_kwargs=dict(fused=False)),
], ids=["reference", "callable", "own-sampling", "rmsprop", "adam-class",
        "own-sgd-fused", "sgd-foreach", "adam-foreach", "sgd-unfused"])
def test_other_runs_take_the_per_iteration_path(kwargs):
    run = pymaml.train(**{"iterations": 20, **QUIET, **kwargs})
    assert run.iterations == 20 and run.fast_iterations == 0


def test_a_torch_optim_class_built_fused_takes_the_fast_path():
    run = pymaml.train(iterations=20, optimizer=torch.optim.AdamW,
                       optimizer_kwargs=dict(fused=True), **QUIET)
    assert run.iterations == 20 and run.fast_iterations == 19  # after torch.optim's first step


@pytest.mark.parametrize("kwargs,fused", [
    (dict(), True), (dict(optimizer="adam"), True),
    # runs that never take the fast path keep torch.optim's default step (no parallel region)
    (dict(backend="reference"), None), (dict(optimizer=torch.optim.SGD), None),
], ids=["sgd", "adam", "reference", "sgd-class"])
def test_the_named_optimizers_are_fused_where_the_fast_path_may_run(tmp_path, kwargs, fused):
    path = tmp_path / "run.ckpt"
    pymaml.train(iterations=3, checkpoint=path, **QUIET, **kwargs)
    optimizer = torch.load(path, weights_only=True)["optimizer"]
    assert optimizer["param_groups"][0]["fused"] is fused
    if kwargs.get("optimizer") == "adam":
        assert optimizer["state"][0]["step"].dtype == torch.float32
