"""The files a command writes, compared as files (pymaml._paths): a checkpoint named
`./run.pt`, `/abs/run.pt` or through a link is still the model file `run.pt`; one kind of pymaml
file (a model, a training checkpoint) never replaces another, nor a figure either, unless the
caller asks (overwrite=True, --overwrite)."""

import os

import pytest
import torch

import pymaml
from pymaml import _paths

from conftest import assert_one_line, run_cli

QUIET = dict(progress=False, log_every=0)
TRAIN = ["train", "--iterations", "30", "--meta-batch-size", "2", "--no-progress",
         "--log-every", "0", "--no-plots"]


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_same_file_compares_files_not_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.pt").write_bytes(b"x")
    os.link(tmp_path / "a.pt", tmp_path / "hard.pt")
    os.symlink(tmp_path / "a.pt", tmp_path / "soft.pt")
    for other in ("./a.pt", str(tmp_path / "a.pt"), "sub/../a.pt", "hard.pt", "soft.pt"):
        assert _paths.same_file("a.pt", other), other
    for missing in ("./new.pt", str(tmp_path / "new.pt"), "sub/../new.pt"):
        assert _paths.same_file("new.pt", missing), missing
    assert not _paths.same_file("a.pt", "new.pt")
    assert not _paths.same_file("a.pt", "sub/a.pt")


@pytest.mark.parametrize("spelling", ["./run.pt", "ABS", "sub/../run.pt", "link.pt"])
def test_the_cli_refuses_a_checkpoint_that_is_the_model_file_however_spelled(
        tmp_path, monkeypatch, capsys, spelling):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "run.pt", tmp_path / "link.pt")  # dangling until run.pt exists
    spelling = str(tmp_path / "run.pt") if spelling == "ABS" else spelling
    code, out, err = run_cli(capsys, *TRAIN, "--out", "run", "--checkpoint", spelling)
    assert code == 1, out
    assert_one_line(err)
    assert f"--checkpoint {spelling} is also the model file (run.pt)" in err, err
    assert not (tmp_path / "run.pt").exists()


def test_a_resume_spelled_differently_resumes_its_own_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pymaml.train(iterations=10, checkpoint="run.ckpt", meta_batch_size=2, **QUIET)
    resumed = pymaml.train(iterations=20, checkpoint="./run.ckpt",
                           resume=str(tmp_path / "run.ckpt"), meta_batch_size=2, **QUIET)
    assert resumed.iterations == 20
    assert torch.load("run.ckpt", weights_only=True)["iteration"] == 20


@pytest.mark.parametrize("algorithm", ["maml", "daml"])
def test_saving_a_model_never_replaces_a_checkpoint_unasked(tmp_path, algorithm):
    ckpt = tmp_path / "x.ckpt"
    run = pymaml.train(algorithm=algorithm, iterations=5, checkpoint=ckpt, **QUIET)
    before = ckpt.read_bytes()
    with pytest.raises(FileExistsError, match=r"x.ckpt holds a training checkpoint, which "
                                              r"\w+.save would replace with a model: pass "
                                              r"overwrite=True") as err:
        run.model.save(ckpt)
    assert "\n" not in str(err.value)
    assert ckpt.read_bytes() == before
    run.model.save(tmp_path / "m.pt")
    run.model.save(tmp_path / "m.pt")  # a model over a model: saving again updates it
    run.model.save(ckpt, overwrite=True)  # asked
    assert type(pymaml.load(ckpt)) is type(run.model)
    assert torch.load(ckpt, weights_only=True)["format"].startswith("pymaml.") and \
        "iteration" not in torch.load(ckpt, weights_only=True)


@pytest.mark.parametrize("content", [b"my notes\n", b"", b"PK\x03\x04 damaged model"])
def test_saving_a_model_never_replaces_a_file_of_the_users_unasked(tmp_path, content):
    """Any file that is not a pymaml model (a user's text, an empty or damaged file) stays."""
    model = pymaml.MetaMLP([1, 8, 1])
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(FileExistsError, match=r"notes.pt holds a file that is not a readable "
                                              r"pymaml file, which MetaMLP.save would replace"):
        model.save(path)
    assert path.read_bytes() == content
    model.save(path, overwrite=True)
    assert isinstance(pymaml.load(path), pymaml.MetaMLP)


@pytest.mark.parametrize("held", ["model", "file"])
def test_a_checkpoint_path_holding_another_kind_of_file_says_what_it_holds(tmp_path, held):
    """Found by the s30-25p review: a run's checkpoint path on a saved model (or a user's
    file) said "checkpoint ... already exists: resume it", which cannot apply."""
    path = tmp_path / "x.pt"
    if held == "model":
        pymaml.MetaMLP([1, 8, 1]).save(path)
    else:
        path.write_bytes(b"my notes\n")
    before = path.read_bytes()
    what = "a model" if held == "model" else "a file that is not a readable pymaml file"
    with pytest.raises(FileExistsError, match=f"x.pt holds {what}, which this run's checkpoint "
                                              r"would replace with a training checkpoint: pass "
                                              r"overwrite=True \(--overwrite\)") as err:
        pymaml.train(iterations=3, checkpoint=path, **QUIET)
    assert "resume" not in str(err.value) and path.read_bytes() == before


def test_the_cli_model_never_replaces_a_checkpoint_unasked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, *TRAIN, "--out", "a")[0] == 0
    os.replace("a.ckpt", "b.pt")  # a checkpoint where run b's model goes
    os.remove("a.pt")
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN, "--out", "b", "--checkpoint", "b.pt.ckpt")
    assert code != 0
    # (refused either as an existing file or as a checkpoint the model would replace)
    assert "b.pt" in err and snapshot(tmp_path) == before
    code, out, err = run_cli(capsys, *TRAIN, "--out", "b", "--checkpoint", "b.pt", "--resume")
    assert code == 1
    assert "is also the model file" in err and snapshot(tmp_path) == before
    os.replace("b.pt", "b.ckpt")
    pymaml.train(iterations=30, meta_batch_size=2, checkpoint="c.ckpt", **QUIET)
    os.replace("c.ckpt", "b.pt")  # another run's checkpoint where run b's model goes
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN, "--out", "b", "--resume")
    assert code == 1
    assert_one_line(err)
    assert "b.pt holds a training checkpoint, which this run's model would replace" in err
    assert "--overwrite" in err and snapshot(tmp_path) == before
    assert run_cli(capsys, *TRAIN, "--out", "b", "--overwrite")[0] == 0  # asked
    assert isinstance(pymaml.load("b.pt"), pymaml.MetaMLP)
    assert "iteration" not in torch.load("b.pt", weights_only=True)


def test_plot_never_writes_its_figure_over_a_pymaml_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    pymaml.MetaMLP([1, 8, 1], info=dict(task="sine")).save("m.pt")
    for target in ("m.pt", "./m.pt", str(tmp_path / "m.pt")):
        before = snapshot(tmp_path)
        code, out, err = run_cli(capsys, "plot", "m.pt", "--out", target, "--tasks", "2")
        assert code == 1
        assert_one_line(err)
        assert "holds a model, which the figure (--out) would replace" in err
        assert snapshot(tmp_path) == before
