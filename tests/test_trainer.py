"""pymaml.train: learning on both sine families, fused == reference loss histories, bitwise
resume (including after Ctrl-C), the NaN stop, checkpoint safety and argument errors."""

import os
import signal

import pytest
import torch

import pymaml
from pymaml import functional as F
from pymaml import tasks
from pymaml.trainer import TrainingDiverged

from conftest import requires_fused

QUIET = dict(progress=False, log_every=0)


def held_out_mse(model, task, steps):
    return pymaml.evaluate(model, task, steps=[steps], num_tasks=200).mse[0]


def test_seed_sine_training_lowers_post_adaptation_loss():
    kw = dict(meta_batch_size=8, optimizer="adam", outer_lr=1e-3, seed=1, **QUIET)
    before = pymaml.train(iterations=0, **kw).model
    after = pymaml.train(iterations=2500, **kw)
    assert after.iterations == 2500 and after.losses.shape == (2500,)
    assert after.losses[-200:].mean() < 0.7 * after.losses[:200].mean()
    assert held_out_mse(after.model, "seed-sine", 5) < 0.5 * held_out_mse(before, "seed-sine", 5)


def test_sine_training_lowers_post_adaptation_loss():
    kw = dict(sizes=[1, 40, 40, 1], loss="mse", inner_steps=1, inner_lr=0.01, meta_batch_size=10,
              optimizer="adam", outer_lr=1e-3, init="torch", shots=10, **QUIET)
    before = pymaml.train("sine", iterations=0, **kw).model
    after = pymaml.train("sine", iterations=1500, **kw).model
    assert held_out_mse(after, "sine", 1) < 0.5 * held_out_mse(before, "sine", 1)


@requires_fused
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_fused_and_reference_loss_histories_agree(algorithm, dtype):
    kw = dict(algorithm=algorithm, iterations=25, meta_batch_size=3, optimizer="adam",
              outer_lr=1e-3, dtype=dtype, **QUIET)
    fused = pymaml.train(backend="fused", **kw)
    ref = pymaml.train(backend="reference", **kw)
    assert fused.config["backend"] == "fused" and ref.config["backend"] == "reference"
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(fused.losses, ref.losses, rtol=tol, atol=tol)
    torch.testing.assert_close(fused.model.params, ref.model.params, rtol=tol, atol=tol)


def test_reptile_update_is_the_mean_adapted_weights():
    # SGD with lr 1 moves the weights exactly onto the mean of the tasks' adapted weights;
    # the inner loop trains on support and query together.
    seen = []

    def sampler(T, generator):
        b = tasks.Sine().sample(T, generator=generator, dtype=torch.float64)
        seen.append(b)
        return b

    run = pymaml.train(sampler, algorithm="reptile", sizes=[1, 8, 1], loss="mse", inner_steps=3,
                       inner_lr=0.02, meta_batch_size=4, iterations=1, optimizer="sgd",
                       outer_lr=1.0, dtype=torch.float64, backend="reference", **QUIET)
    start = pymaml.train(sampler, sizes=[1, 8, 1], iterations=0, dtype=torch.float64, **QUIET).model.params
    b = seen[0]
    adapted = F.adapt(start.detach(), torch.cat([b.x_support, b.x_query], 1),
                      torch.cat([b.y_support, b.y_query], 1), sizes=[1, 8, 1], inner_lr=0.02,
                      steps=3, loss="mse", first_order=True, backend="reference")
    torch.testing.assert_close(run.model.params.detach(), adapted.mean(0))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_is_bitwise(tmp_path, optimizer):
    kw = dict(iterations=120, meta_batch_size=2, optimizer=optimizer,
              outer_lr=1e-3 if optimizer == "adam" else 1e-2, checkpoint_every=25, **QUIET)
    whole = pymaml.train(checkpoint=tmp_path / "whole.ckpt", **kw)
    ckpt = tmp_path / "half.ckpt"
    half = pymaml.train(checkpoint=ckpt, **{**kw, "iterations": 60})
    assert half.iterations == 60
    rest = pymaml.train(checkpoint=ckpt, resume=True, **kw)
    assert rest.iterations == 120
    assert torch.equal(rest.model.params, whole.model.params)
    assert torch.equal(rest.losses, whole.losses)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["iteration"] == 120 and saved["losses"].shape == (120,)


def test_ctrl_c_checkpoints_and_resumes_bitwise(tmp_path):
    def interrupting(at):
        calls = []

        def sampler(T, generator):
            calls.append(1)
            if len(calls) == at:
                os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C, mid-iteration
            return tasks.SeedSine().sample(T, generator=generator)
        sampler.__name__ = "seed-like"
        return sampler

    kw = dict(iterations=80, meta_batch_size=2, optimizer="adam", outer_lr=1e-3, **QUIET)
    whole = pymaml.train(interrupting(at=0), **kw)
    ckpt = tmp_path / "run.ckpt"
    stopped = pymaml.train(interrupting(at=33), checkpoint=ckpt, **kw)
    assert stopped.status == "interrupted" and stopped.iterations == 33  # the iteration finished
    assert torch.load(ckpt, weights_only=True)["iteration"] == 33
    # the handler is gone after train: the next Ctrl-C would be Python's again
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = pymaml.train(interrupting(at=0), checkpoint=ckpt, resume=True, **kw)
    assert resumed.status == "completed"
    assert torch.equal(resumed.model.params, whole.model.params)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    calls = []

    def poisoned(T, generator):
        calls.append(1)
        b = tasks.SeedSine().sample(T, generator=generator)
        if len(calls) == 27:
            b.y_query[0, 0, 0] = float("nan")
        return b

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(TrainingDiverged, match="nan at iteration 27.*run.ckpt, is kept") as err:
        pymaml.train(poisoned, iterations=100, checkpoint=ckpt, checkpoint_every=10, **QUIET)
    assert err.value.iteration == 27
    saved = torch.load(ckpt, weights_only=True)
    assert saved["iteration"] == 20 and torch.isfinite(saved["model"]["params"]).all()


def test_existing_checkpoint_is_never_replaced_silently(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    pymaml.train(iterations=5, checkpoint=ckpt, **QUIET)
    before = ckpt.read_bytes()
    with pytest.raises(FileExistsError, match="resume"):
        pymaml.train(iterations=5, checkpoint=ckpt, **QUIET)
    assert ckpt.read_bytes() == before
    pymaml.train(iterations=7, checkpoint=ckpt, overwrite=True, **QUIET)
    assert torch.load(ckpt, weights_only=True)["iteration"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary files left


def test_resume_checks_the_run_settings(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    pymaml.train(iterations=5, checkpoint=ckpt, **QUIET)
    with pytest.raises(ValueError, match="inner_lr=0.03 \\(this call: 0.05\\)"):
        pymaml.train(iterations=10, inner_lr=0.05, checkpoint=ckpt, resume=True, **QUIET)
    with pytest.raises(ValueError, match="past iterations=3"):
        pymaml.train(iterations=3, checkpoint=ckpt, resume=True, **QUIET)
    with pytest.raises(FileNotFoundError):
        pymaml.train(iterations=5, checkpoint=tmp_path / "none.ckpt", resume=True, **QUIET)
    with pytest.raises(ValueError, match="needs the checkpoint path"):
        pymaml.train(iterations=5, resume=True, **QUIET)
    model_file = tmp_path / "m.pt"
    pymaml.MetaMLP([1, 32, 32, 1]).save(model_file)
    with pytest.raises(ValueError, match=r"saved MAML model \(a MetaMLP\), not a training checkpoint"):
        pymaml.train(iterations=5, resume=model_file, **QUIET)


def test_custom_optimizer_and_initial_model():
    start = pymaml.MetaMLP([1, 16, 1], loss="mse")
    run = pymaml.train("sine", sizes=[1, 16, 1], loss="mse", iterations=20, init=start,
                       optimizer=torch.optim.RMSprop, optimizer_kwargs=dict(alpha=0.9),
                       outer_lr=1e-3, **QUIET)
    assert run.config["optimizer"] == "torch.optim.rmsprop.RMSprop"
    assert not torch.equal(run.model.params, start.params)  # trained a copy
    assert run.model.info["task"] == "sine" and run.model.inner_steps == 5


def test_progress_bar_and_log_lines(capsys):
    pymaml.train(iterations=30, progress=True, log_every=10)
    out, err = capsys.readouterr()
    assert "meta-training" in err and "30/30" in err
    assert [line.split()[1] for line in out.splitlines()] == ["10/30", "20/30", "30/30"]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(algorithm="maml2"), ValueError, "algorithm must be one of"),
    (dict(optimizer="adamw"), ValueError, "optimizer must be one of"),
    (dict(optimizer=torch.nn.Linear), TypeError, "torch.optim.Optimizer class"),
    (dict(meta_batch_size=0), ValueError, "meta_batch_size must be an int >= 1"),
    (dict(iterations=-1), ValueError, "iterations must be an int >= 0"),
    (dict(inner_steps=1.5), ValueError, "inner_steps must be an int"),
    (dict(inner_lr=float("nan")), ValueError, "inner_lr must be a finite number"),
    (dict(outer_lr=0), ValueError, "outer_lr must be a positive"),
    (dict(sizes=[2, 8, 1]), ValueError, "1 input feature\\(s\\) but sizes is \\[2, 8, 1\\]"),
    (dict(init="xavier"), ValueError, "init must be one of"),
    (dict(init=3), TypeError, "init must be"),
    (dict(init=torch.zeros(5)), ValueError, "params must be \\[P\\] with P = 1153"),
    (dict(optimizer_kwargs=dict(lr=1)), ValueError, "outer_lr, not in optimizer_kwargs"),
    (dict(optimizer_kwargs=dict(betas=torch.ones(2))), TypeError, "optimizer_kwargs may hold only"),
    (dict(dtype=torch.float16), TypeError, "dtype must be"),
    (dict(device="gpu0"), ValueError, "device must be"),
    (dict(device="cuda:99"), ValueError, "is not usable here"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(checkpoint_every=0), ValueError, "checkpoint_every must be"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        pymaml.train(**{"iterations": 1, **QUIET, **kwargs})


def test_resuming_into_another_existing_checkpoint_is_refused(tmp_path):
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    pymaml.train(iterations=5, checkpoint=a, **QUIET)
    pymaml.train(iterations=5, seed=1, checkpoint=b, **QUIET)
    before = b.read_bytes()
    with pytest.raises(FileExistsError, match="b.ckpt already exists"):
        pymaml.train(iterations=8, checkpoint=b, resume=a, **QUIET)
    assert b.read_bytes() == before


def test_non_finite_weights_after_the_step_stop_training(tmp_path):
    # Adam with eps=0 divides 0 by 0 for parameters whose gradient is exactly zero.
    with pytest.raises(TrainingDiverged, match="optimizer step of iteration 1 made the weights non-finite") as err:
        pymaml.train(iterations=5, optimizer="adam", optimizer_kwargs=dict(eps=0.0),
                     checkpoint=tmp_path / "run.ckpt", **QUIET)
    assert "is kept" not in str(err.value)  # this run wrote no checkpoint yet
    assert not (tmp_path / "run.ckpt").exists()


def test_numpy_settings_are_saved_as_plain_values(tmp_path):
    np = pytest.importorskip("numpy")
    ckpt = tmp_path / "run.ckpt"
    kw = dict(optimizer="sgd", optimizer_kwargs=dict(momentum=np.float64(0.5)), **QUIET)
    pymaml.train(iterations=4, checkpoint=ckpt, **kw)
    assert pymaml.train(iterations=6, checkpoint=ckpt, resume=True, **kw).iterations == 6
    assert torch.load(ckpt, weights_only=True)["config"]["optimizer_kwargs"] == {"momentum": 0.5}


def test_checkpoint_directory_is_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="the directory .*missing does not exist"):
        pymaml.train(iterations=5, checkpoint=tmp_path / "missing" / "run.ckpt", **QUIET)


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        def sampler(T, generator):
            os.kill(os.getpid(), signal.SIGINT)
            return tasks.SeedSine().sample(T, generator=generator)
        run = pymaml.train(sampler, iterations=3, **QUIET)
        assert run.status == "completed" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(seed=2**70), ValueError, "seed must be an int in"),
    (dict(seed=-1), ValueError, "seed must be an int in"),
    (dict(task=tasks.Sine), TypeError, "pass Sine\\(\\), not the class"),
    (dict(optimizer_kwargs="momentum"), TypeError, "optimizer_kwargs must be a dict"),
    (dict(checkpoint=3), TypeError, "checkpoint must be a file path"),
    (dict(resume=1), TypeError, "resume must be a file path"),
])
def test_more_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        pymaml.train(**{"iterations": 1, **QUIET, **kwargs})


@pytest.mark.parametrize("optimizer,kwargs,match", [
    ("sgd", {"momentum": "abc"}, "momentum='abc': momentum must be a finite number .*'abc' is "
                                 "not a number"),
    ("sgd", {"momentum": float("nan")}, "momentum must be a finite number"),
    ("sgd", {"betas": (0.9, 0.99)}, "SGD takes no argument 'betas' \\(it takes momentum"),
    ("sgd", {"nesterov": "yes"}, "nesterov must be True or False"),
    ("adam", {"betas": (0.9,)}, "betas must be 2 numbers for Adam"),
    ("adam", {"betas": (0.9, 2.0)}, "Adam refuses them: Invalid beta parameter"),
    ("sgd", {"momentum": -1}, "SGD refuses them: Invalid momentum value"),
])
def test_optimizer_kwargs_are_checked_before_training(optimizer, kwargs, match):
    with pytest.raises(ValueError, match=f"optimizer_kwargs .*{match}"):
        pymaml.train(iterations=1, optimizer=optimizer, optimizer_kwargs=kwargs, **QUIET)


def test_non_finite_initial_weights_are_refused():
    bad = F.init_params([1, 32, 32, 1])
    bad[3] = float("nan")
    for init in (bad, pymaml.MetaMLP([1, 32, 32, 1], params=bad)):
        with pytest.raises(ValueError, match="init holds non-finite weights"):
            pymaml.train(iterations=1, init=init, **QUIET)


@requires_fused
def test_auto_says_when_inner_steps_beyond_the_fused_limit_send_it_to_the_reference():
    limit = pymaml._ops._C.max_steps
    with pytest.warns(RuntimeWarning, match=f"steps={limit + 1} is beyond the fused op's limit "
                                            f"of {limit}"):
        run = pymaml.train(iterations=1, sizes=[1, 4, 1], inner_steps=limit + 1, **QUIET)
    assert run.config["backend"] == "reference"


def test_inner_batch_gives_each_step_the_next_points(monkeypatch):
    # Step k of the inner loop trains on points k * B .. k * B + B - 1 (mod N) of the task.
    x = torch.arange(8.0).reshape(1, 8, 1)
    batches = tasks.per_step_batches(x, 3, 3)
    assert batches.shape == (1, 3, 3, 1)
    assert batches.flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    with pytest.raises(ValueError, match="inner_batch=9 is more than the 8 points"):
        tasks.per_step_batches(x, 3, 9)


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_inner_batch_trains_as_the_functional_api_with_per_step_batches(algorithm):
    # One iteration of SGD with lr 1: the weights move by exactly the meta-batch's gradient,
    # which the functional API gives for the same per-step batches.
    seen = []

    def sampler(T, generator):
        batch = tasks.SeedSine().sample(T, generator=generator)
        seen.append(batch)
        return tuple(batch)

    run = pymaml.train(sampler, algorithm=algorithm, inner_batch=2, iterations=1, outer_lr=1.0,
                       loss="mse", inner_steps=3, **QUIET)
    start = pymaml.train(sampler, iterations=0, **QUIET).model.params.detach()
    xs, ys, xq, yq = seen[0]
    if algorithm == "reptile":
        xs, ys = torch.cat([xs, xq], 1), torch.cat([ys, yq], 1)
    xs, ys = (tasks.per_step_batches(t, 3, 2) for t in (xs, ys))
    hyper = dict(sizes=[1, 32, 32, 1], inner_lr=3e-2, steps=3, loss="mse", backend="reference")
    if algorithm == "reptile":
        step = start - F.adapt(start, xs, ys, **hyper).mean(0)
    else:
        p = start.clone().requires_grad_()
        F.maml_loss(p, xs, ys, xq, yq, **hyper).backward()
        step = p.grad
    torch.testing.assert_close(start - run.model.params.detach(), step, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(inner_batch=0), "inner_batch must be"),
    (dict(inner_batch=2, inner_steps=0), "inner_batch .* needs inner_steps >= 1"),
    (dict(inner_batch=5), "inner_batch=5 is more than the 4 points"),
])
def test_bad_inner_batch_is_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pymaml.train(iterations=3, **QUIET, **kwargs)
