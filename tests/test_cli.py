"""The command line (pymaml.cli.main, in-process): train / eval / plot, and one-line errors
with exit code 2 for bad flags and 1 for bad files or settings."""

import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

import pymaml
from pymaml.cli import main

from conftest import assert_one_line, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN = ["train", "--iterations", "40", "--meta-batch-size", "2", "--no-progress", "--log-every", "0"]



def assert_png(path):
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE) and data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A directory with the outputs of one short `pymaml train` (shared by eval / plot tests,
    which copy what they need)."""
    d = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert main(TRAIN + ["--no-plots"]) == 0
    finally:
        os.chdir(cwd)
    return d


@pytest.fixture
def model_here(trained, tmp_path, monkeypatch):
    """The trained model and checkpoint copied into the (current) test directory."""
    for name in ("maml-sine.pt", "maml-sine.ckpt"):
        shutil.copy(trained / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- train ------------------------------------------------------------------------------------

def test_train_writes_figures_model_and_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["maml-sine-loss.png", "maml-sine.ckpt", "maml-sine.png",
                                            "maml-sine.pt"]
    assert_png(tmp_path / "maml-sine.png")
    assert_png(tmp_path / "maml-sine-loss.png")
    assert "mean absolute error" in out
    assert "40 meta-iterations done" in out
    model = pymaml.load(tmp_path / "maml-sine.pt")
    assert model.sizes == [1, 32, 32, 1] and model.info["iterations"] == 40
    ckpt = torch.load(tmp_path / "maml-sine.ckpt", weights_only=True)
    assert ckpt["iteration"] == 40
    assert torch.equal(ckpt["model"]["params"], model.params.detach())


def test_train_refuses_to_overwrite_then_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, *TRAIN, "--no-plots")[0] == 0
    model_bytes = (tmp_path / "maml-sine.pt").read_bytes()
    ckpt_bytes = (tmp_path / "maml-sine.ckpt").read_bytes()

    code, out, err = run_cli(capsys, *TRAIN, "--no-plots")
    assert code != 0
    assert_one_line(err)
    assert "--resume" in err
    assert (tmp_path / "maml-sine.pt").read_bytes() == model_bytes
    assert (tmp_path / "maml-sine.ckpt").read_bytes() == ckpt_bytes

    argv = [a if a != "40" else "60" for a in TRAIN]
    code, out, err = run_cli(capsys, *argv, "--no-plots", "--resume")
    assert code == 0, err
    ckpt = torch.load(tmp_path / "maml-sine.ckpt", weights_only=True)
    assert ckpt["iteration"] == 60
    assert ckpt["losses"].numel() == 60
    resumed = pymaml.load(tmp_path / "maml-sine.pt")
    assert resumed.info["iterations"] == 60
    assert torch.equal(resumed.params, ckpt["model"]["params"])

    # bitwise the same weights as an uninterrupted 60-iteration run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    assert run_cli(capsys, *argv, "--no-plots")[0] == 0
    assert torch.equal(pymaml.load(fresh / "maml-sine.pt").params, resumed.params)


def test_train_out_prefix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN, "--out", "run1")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["run1-loss.png", "run1.ckpt", "run1.png", "run1.pt"]
    assert_png(tmp_path / "run1.png")
    assert_png(tmp_path / "run1-loss.png")
    assert pymaml.load(tmp_path / "run1.pt").info["iterations"] == 40


# ---- eval and plot ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["maml-sine.pt", "maml-sine.ckpt"])
def test_eval_prints_table(model_here, capsys, name):
    code, out, err = run_cli(capsys, "eval", name, "--tasks", "50", "--steps", "0,1")
    assert code == 0, err
    assert name in out.splitlines()[0]
    assert "50 held-out 'seed-sine' tasks" in out
    rows = re.findall(r"^\s*(\d+)\s+(\d+\.\d+) ±", out, flags=re.M)
    assert [s for s, _ in rows] == ["0", "1"]
    assert all(float(mse) >= 0 for _, mse in rows)


def test_plot_writes_figure(model_here, capsys):
    code, out, err = run_cli(capsys, "plot", "maml-sine.pt", "--tasks", "2", "--out", "f.png")
    assert code == 0, err
    assert_png(model_here / "f.png")
    assert "2 tasks" in out
    assert len(re.findall(r"\d+\.\d{3}", out)) == 2  # one error per task


def test_plot_default_name(model_here, capsys):
    code, out, err = run_cli(capsys, "plot", "maml-sine.pt", "--tasks", "1")
    assert code == 0, err
    assert_png(model_here / "maml-sine-tasks.png")


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["train", "--iterations", "abc"],
    ["train", "--iterations", "-1"],
    ["train", "--sizes", "1,x"],
    ["train", "--task", "nope"],
    ["train", "--optimizer", "nosuch"],
    ["eval"],
], ids=lambda a: " ".join(a))
def test_bad_flags_exit_2_with_one_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    out, err = capsys.readouterr()
    assert_one_line(err)
    assert err.startswith(f"pymaml {argv[0]}: error: ")
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.parametrize("command", ["eval", "plot"])
def test_missing_model_file(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, command, "missing.pt")
    assert code == 1
    assert_one_line(err)
    assert "missing.pt" in err


@pytest.mark.parametrize("command", ["eval", "plot"])
def test_garbage_model_file(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.pt").write_bytes(random.Random(0).randbytes(256))
    code, out, err = run_cli(capsys, command, "garbage.pt")
    assert code == 1
    assert_one_line(err)
    assert "garbage.pt" in err


def test_foreign_torch_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    code, out, err = run_cli(capsys, "eval", "other.pt")
    assert code == 1
    assert_one_line(err)
    assert "other.pt" in err


def test_text_file_as_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.pt").write_text("hello world\n")
    code, out, err = run_cli(capsys, "eval", "notes.pt")
    assert code == 1
    assert_one_line(err)


def test_train_init_missing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN, "--init", "missing.pt")
    assert code == 1
    assert_one_line(err)
    assert "--init missing.pt: no such file" in err
    assert os.listdir(tmp_path) == []


def test_train_setting_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", "--iterations", "5", "--sizes", "2,8,1", "--no-progress")
    assert code == 1
    assert_one_line(err)
    assert err.startswith("pymaml train: error: ")
    assert "[2, 8, 1]" in err
    assert os.listdir(tmp_path) == []


def run_subprocess(*argv, cwd, timeout=120):
    """`python -m pymaml argv...` in a new process that imports this tree's pymaml (the one
    under test), whatever else is installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(pymaml.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "pymaml", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_subprocess_imports_the_tree_under_test(tmp_path):
    proc = run_subprocess("info", cwd=tmp_path)
    code = "import pymaml, sys; sys.stdout.write(pymaml.__file__)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(pymaml.__file__)))
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=root), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert where.stdout == pymaml.__file__


def test_subprocess_missing_file_no_traceback(tmp_path):
    proc = run_subprocess("eval", "missing.pt", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "missing.pt" in proc.stderr


def test_checkpoint_may_not_be_the_model_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN, "--out", "s", "--checkpoint", "s.pt")
    assert code == 1
    assert_one_line(err)
    assert "--checkpoint s.pt is also the model file" in err
    assert list(tmp_path.iterdir()) == []


def test_eval_of_a_model_trained_on_a_custom_task_asks_for_task(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    pymaml.MetaMLP([1, 8, 1], info=dict(task="my-lines")).save("m.pt")
    code, out, err = run_cli(capsys, "eval", "m.pt", "--tasks", "10")
    assert code == 1
    assert_one_line(err)
    assert "trained on task 'my-lines'" in err and "pass --task" in err
    code, out, err = run_cli(capsys, "eval", "m.pt", "--tasks", "10", "--task", "sine")
    assert code == 0


# ---- every failure in words, one line, before the work ------------------------------------------

def test_threads_beyond_the_cpus_are_refused(tmp_path, monkeypatch, capsys):
    from pymaml import cli
    monkeypatch.chdir(tmp_path)
    cpus = cli._available_cpus()
    for command in ("train", "eval"):
        argv = [command] + (["m.pt"] if command == "eval" else []) + ["--threads", str(cpus + 1)]
        code, out, err = run_cli(capsys, *argv)
        assert code == 2
        assert_one_line(err)
        assert f"--threads: must be at most {cpus}, the CPUs available to this process" in err
    code, out, err = run_cli(capsys, "train", "--threads", str(10**12))
    assert code == 2 and "must be at most" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("arg,words", [
    ("momentum=abc", "--optimizer-arg momentum='abc': momentum must be a finite number for SGD "
                     "(default 0), and 'abc' is not a number"),
    ("momentum=", "momentum must be a finite number"),
    ("betas=(0.9,0.99)", "SGD takes no argument 'betas'"),
    ("momentum=-2", "SGD refuses them: Invalid momentum value"),
    ("lr=0.1", "--optimizer-arg lr=0.1: give the outer learning rate as outer_lr (--outer-lr)"),
])
def test_bad_optimizer_args_exit_2_in_words(arg, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN, "--optimizer-arg", arg)
    assert code == 2
    assert_one_line(err)
    assert words in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["eval", "plot"])
def test_a_directory_as_the_model_says_so(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.pt").mkdir()
    code, out, err = run_cli(capsys, command, "run.pt")
    assert code == 1
    assert_one_line(err)
    assert "run.pt is a directory" in err and "no such file" not in err


EVIL = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"format": "pymaml.MetaMLP", "x": Payload()}, sys.argv[1])
"""


def test_a_malicious_pickle_is_not_loaded_and_not_a_pymaml_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-c", EVIL, "evil.pt", "pwned"], check=True, timeout=120)
    assert (tmp_path / "evil.pt").is_file() and not (tmp_path / "pwned").exists()
    for argv in (["eval", "evil.pt"], ["plot", "evil.pt"], [*TRAIN, "--init", "evil.pt"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 1
        assert_one_line(err)
        assert "evil.pt is not a pymaml file" in err and "weights_only" not in err
    proc = run_subprocess("eval", "evil.pt", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not a pymaml file" in proc.stderr and "weights_only" not in proc.stderr
    assert not (tmp_path / "pwned").exists()  # the payload never ran


def test_an_unexpected_error_is_one_line_not_a_traceback(model_here, monkeypatch, capsys):
    from pymaml import cli

    def broken(*args, **kwargs):
        raise KeyError("something pymaml did not expect")
    monkeypatch.setattr(cli, "evaluate", broken)
    code, out, err = run_cli(capsys, "eval", "maml-sine.pt")
    assert code == 1
    assert_one_line(err)
    assert err.startswith("pymaml eval: internal error: KeyError:")


@pytest.mark.skipif(not pymaml.fused_available(), reason="the warning is the fused op's limit")
def test_warnings_are_one_line_each(model_here, capsys):
    code, out, err = run_cli(capsys, "eval", "maml-sine.pt", "--tasks", "2", "--steps", "101")
    assert code == 0
    lines = err.splitlines()
    assert lines and all(line.startswith("pymaml eval: warning: ") for line in lines), err
