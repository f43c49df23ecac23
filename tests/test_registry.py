"""The trainer's promises, each written once and checked for every algorithm of the registry
(pymaml.algorithms.NAMES): a resumed run is bitwise the uninterrupted one; the fused backend
trains as the autograd reference does; a saved model loads back as the same algorithm's model
with the same tensors; a damaged checkpoint is refused before any work; a bad setting is refused
naming the argument, and on the command line in one line with exit code 1 (a bad flag value:
2). A new entry of the registry is checked by these tests without a line more.
"""

import pytest
import torch

import pymaml
import pymaml.trainer
from pymaml import algorithms

from conftest import assert_one_line, requires_fused, run_cli

QUIET = dict(progress=False, log_every=0)
ALGORITHMS = pytest.mark.parametrize("name", algorithms.NAMES)


def run(name, **kw):
    kw = {**dict(iterations=12, meta_batch_size=2, optimizer="adam", outer_lr=1e-3,
                 checkpoint_every=6, seed=4), **QUIET, **kw}
    return pymaml.train(algorithm=name, **kw)


def weights(model):
    """Every tensor a run trains: the entry's own list (params, rates, loss network...)."""
    return [w.detach() for w in algorithms.for_model(model).weights(model)]


def test_the_registry_is_the_one_list_of_algorithms():
    assert pymaml.trainer.ALGORITHMS == algorithms.NAMES
    assert len(set(algorithms.NAMES)) == len(algorithms.NAMES)
    for name in algorithms.NAMES:
        assert algorithms.get(name).name == name
    with pytest.raises(ValueError, match="algorithm"):
        algorithms.get("no-such-algorithm")


@requires_fused
@ALGORITHMS
def test_a_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path, name):
    whole = run(name)
    ckpt = tmp_path / "run.ckpt"
    assert run(name, iterations=6, checkpoint=ckpt).iterations == 6
    rest = run(name, checkpoint=ckpt, resume=True)
    assert torch.equal(rest.losses, whole.losses)
    for a, b in zip(weights(rest.model), weights(whole.model), strict=True):
        assert torch.equal(a, b)


@requires_fused
@ALGORITHMS
def test_the_fused_backend_trains_as_the_reference(name):
    fused = run(name, backend="fused", dtype=torch.float64, iterations=5)
    reference = run(name, backend="reference", dtype=torch.float64, iterations=5)
    torch.testing.assert_close(fused.losses, reference.losses, rtol=1e-9, atol=1e-12)
    for a, b in zip(weights(fused.model), weights(reference.model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@ALGORITHMS
def test_a_saved_model_loads_back_as_its_algorithms_model(tmp_path, name):
    model = run(name, iterations=2, backend="reference").model
    model.save(tmp_path / "m.pt")
    loaded = pymaml.load(tmp_path / "m.pt")
    assert type(loaded) is type(model)
    assert algorithms.for_model(loaded) is algorithms.for_model(model)
    for a, b in zip(weights(loaded), weights(model), strict=True):
        assert torch.equal(a, b)


@ALGORITHMS
def test_a_damaged_checkpoint_is_refused_before_any_work(tmp_path, name):
    ckpt = tmp_path / "run.ckpt"
    run(name, iterations=6, checkpoint=ckpt, backend="reference")
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x01
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="run.ckpt is damaged"):
        run(name, checkpoint=ckpt, resume=True, backend="reference")
    with pytest.raises(ValueError, match="run.ckpt is damaged"):
        pymaml.load(ckpt)
    assert ckpt.read_bytes() == bytes(data)


@ALGORITHMS
@pytest.mark.parametrize("bad, match", [(dict(inner_steps=-1), "inner_steps"),
                                        (dict(meta_batch_size=0), "meta_batch_size"),
                                        (dict(outer_lr=float("nan")), "outer_lr"),
                                        (dict(sizes=[1, 0, 1]), "sizes")])
def test_a_bad_setting_is_refused_naming_it(name, bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        run(name, **bad)


@ALGORITHMS
@pytest.mark.parametrize("argv, code, match", [
    (["--inner-lr", "nan"], 2, "--inner-lr"),  # its flag says so (a finite number)
    (["--sizes", "2,8,1"], 1, "sizes"),
    (["--meta-batch-size", "0"], 2, "--meta-batch-size"),
    (["--iterations", "many"], 2, "--iterations")])
def test_the_command_line_refuses_a_bad_setting_in_one_line(name, argv, code, match, tmp_path,
                                                            monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    got, out, err = run_cli(capsys, "train", "--algorithm", name, "--iterations", "3",
                            "--no-progress", *argv)
    assert got == code and match in err
    assert_one_line(err)
    assert not list(tmp_path.iterdir())  # nothing written
