"""Files written by commit 969acf4 (before the package refactor) keep loading and resuming.

For each run of tests/data/make_v969acf4_files.py (every algorithm, learned per-layer-step
rates, DAML; chunked fast paths and the per-iteration path): its saved model loads with
pymaml.load, holds the 969acf4 run's weights and evaluates to the same numbers; its checkpoint
(stopped at iteration 20) loads, and resumed to 40 iterations with the same settings it ends
bitwise equal to 969acf4's uninterrupted 40-iteration run (weights, learned rates, loss
network, loss history). The fixtures and how they were made: tests/data/make_v969acf4_files.py.
Against another build, e.g. 969acf4's own:  PYTHONPATH=<build> python -P -m pytest
tests/test_files_969acf4.py  (-P: `python -m` would put this checkout's pymaml first).
"""

import os
import shutil

import pytest
import torch

import pymaml

from conftest import requires_fused

pytestmark = requires_fused

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "v969acf4")
NAMES = ["maml", "maml_per_iteration", "fomaml", "reptile", "metasgd", "anil", "per_layer_step",
         "daml", "daml_per_iteration"]
QUIET = dict(progress=False, log_every=0)


def expected(name):
    return torch.load(os.path.join(DATA, f"{name}.expected"), weights_only=True)


def assert_tensors_equal(model, tensors, what):
    for key, want in tensors.items():
        got = getattr(model, key)
        assert got is not None, f"{what}: the model has no {key}"
        assert torch.equal(got.detach(), want), f"{what}: {key} differs from 969acf4's"
    if "learned_lr" not in tensors:
        assert getattr(model, "learned_lr", None) is None, f"{what}: unexpected learned rates"


def test_every_fixture_is_there():
    assert sorted(os.listdir(DATA)) == sorted(f"{n}.{ext}" for n in NAMES
                                              for ext in ("ckpt", "pt", "expected"))


@pytest.mark.parametrize("name", NAMES)
def test_model_file_loads_with_969acf4s_weights(name):
    exp = expected(name)
    model = pymaml.load(os.path.join(DATA, f"{name}.pt"))
    daml = exp["settings"].get("algorithm") == "daml"
    assert isinstance(model, pymaml.DAMLModel if daml else pymaml.MetaMLP)
    assert list(model.sizes) == exp["settings"]["sizes"]
    assert_tensors_equal(model, exp["final"], f"{name}.pt")


@pytest.mark.parametrize("name", NAMES)
def test_model_file_evaluates_as_on_969acf4(name):
    exp = expected(name)
    settings = exp["settings"]
    model = pymaml.load(os.path.join(DATA, f"{name}.pt"))
    if settings.get("algorithm") == "daml":
        result = pymaml.evaluate(model, num_tasks=20)
        got = [r["mae"] for r in result.rows]
    else:
        result = pymaml.evaluate(model, settings.get("task", "seed-sine"), shots=4, steps=[1, 2],
                                 num_tasks=20)
        got = list(result.mse)
    assert result.table()
    assert got == exp["eval"]


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_loads_as_the_model_at_iteration_20(name):
    exp = expected(name)
    model = pymaml.load(os.path.join(DATA, f"{name}.ckpt"))
    assert_tensors_equal(model, exp["mid"], f"{name}.ckpt")


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_resumes_bitwise_to_969acf4s_uninterrupted_run(tmp_path, name):
    exp = expected(name)
    path = tmp_path / f"{name}.ckpt"
    shutil.copy(os.path.join(DATA, f"{name}.ckpt"), path)  # resuming writes over it
    resumed = pymaml.train(iterations=40, checkpoint=path, resume=True, **exp["settings"],
                           **QUIET)
    assert resumed.status == "completed" and resumed.iterations == 40
    assert torch.equal(resumed.losses, exp["losses"])
    assert_tensors_equal(resumed.model, exp["final"], f"{name} resumed")
    # the checkpoint the resumed run wrote holds the same
    assert_tensors_equal(pymaml.load(path), exp["final"], f"{name}.ckpt rewritten")
