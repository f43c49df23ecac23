"""Resuming, as a newcomer meets it: a resume left without iterations goes on to its own run's
end (not to the default's 275,000), says where it resumes from, and says plainly when the run
is finished and there is nothing left to train, instead of "training" for 0.0 s."""

import os
import signal

import torch

import pymaml
from pymaml import tasks

from conftest import run_cli

QUIET = dict(progress=False, log_every=0)
KW = dict(meta_batch_size=2, optimizer="adam", outer_lr=1e-3)
TRAIN = ["train", "--meta-batch-size", "2", "--no-progress", "--log-every", "0", "--no-plots"]


def interrupted_at(at):
    """A seed-sine sampler that Ctrl-C's the run during its iteration `at`."""
    calls = []

    def sampler(T, generator):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGINT)
        return tasks.SeedSine().sample(T, generator=generator)
    sampler.__name__ = "seed-like"
    return sampler


def test_a_resume_without_iterations_goes_on_to_its_own_runs_end(tmp_path):
    whole = pymaml.train(interrupted_at(0), iterations=60, **KW, **QUIET)
    ckpt = tmp_path / "run.ckpt"
    stopped = pymaml.train(interrupted_at(25), iterations=60, checkpoint=ckpt, **KW, **QUIET)
    assert stopped.status == "interrupted" and stopped.iterations == 25
    resumed = pymaml.train(interrupted_at(0), checkpoint=ckpt, resume=True, **KW, **QUIET)
    assert resumed.status == "completed" and resumed.start == 25
    assert resumed.iterations == 60 and resumed.config["iterations"] == 60  # not 275,000
    assert torch.equal(resumed.model.params, whole.model.params)  # bitwise, as before
    assert torch.equal(resumed.losses, whole.losses)
    assert torch.load(ckpt, weights_only=True)["config"]["iterations"] == 60


def test_a_finished_run_resumed_says_there_is_nothing_left(tmp_path, capsys):
    ckpt = tmp_path / "run.ckpt"
    done = pymaml.train(iterations=30, checkpoint=ckpt, **KW, **QUIET)
    again = pymaml.train(checkpoint=ckpt, resume=True, **KW, progress=False)
    out = capsys.readouterr().out
    assert f"resuming from {ckpt} at iteration 30 of 30: the run is finished, nothing left " \
           "to train" in out
    assert again.iterations == 30 == again.start and again.status == "completed"
    assert torch.equal(again.model.params, done.model.params)
    assert torch.equal(again.losses, done.losses)
    assert again.summary()[0].endswith("nothing left to train")
    further = pymaml.train(iterations=40, checkpoint=ckpt, resume=True, **KW, progress=False)
    out = capsys.readouterr().out
    assert f"resuming from {ckpt} at iteration 30 of 40\n" in out
    assert further.iterations == 40 and further.start == 30
    assert "10 of them in this call (from iteration 30), training took" in further.summary()[0]
    pymaml.train(iterations=40, checkpoint=ckpt, resume=True, **KW, **QUIET)
    assert capsys.readouterr().out == ""  # a quiet run says nothing


def test_the_cli_resume_of_a_finished_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN, "--iterations", "30")
    assert code == 0 and "training took" in out
    loud = [a for a in TRAIN if a not in ("--log-every", "0")]  # (quiet runs say nothing)
    code, out, err = run_cli(capsys, *loud, "--resume")
    assert code == 0, err
    assert "resuming from maml-sine.ckpt at iteration 30 of 30: the run is finished, nothing " \
           "left to train (pass a larger iterations, --iterations, to train it further)" in out
    assert "30 meta-iterations done" in out and "training took" not in out
    assert torch.load("maml-sine.ckpt", weights_only=True)["config"]["iterations"] == 30
    assert pymaml.load("maml-sine.pt").info["iterations"] == 30
    code, out, err = run_cli(capsys, *loud, "--resume", "--iterations", "45")
    assert code == 0, err
    assert "resuming from maml-sine.ckpt at iteration 30 of 45\n" in out
    assert "45 meta-iterations done" in out and "15 of them in this call" in out
