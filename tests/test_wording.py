"""Errors that say what is wrong, in one line naming the argument or file: a path ending in '/'
and a directory that takes no files are not "a directory that does not exist"; a resume from
a saved model says which model and which run it can start; a wrong --outer-lr is named as
such; a device this torch build lacks is said so, not in torch's internal words."""

import os

import pytest
import torch

import pymaml

from conftest import assert_one_line, run_cli

QUIET = dict(progress=False, log_every=0)
TRAIN = ["train", "--iterations", "5", "--no-progress", "--log-every", "0", "--no-plots"]


def test_a_path_ending_in_a_separator_names_a_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for path in ("x.ckpt/", str(tmp_path / "x.ckpt") + "/"):
        with pytest.raises(ValueError, match="checkpoint .*x.ckpt/ ends with '/', so it names "
                                             "a directory; give a file path"):
            pymaml.train(iterations=5, checkpoint=path, **QUIET)
        with pytest.raises(ValueError, match="ends with '/'"):
            pymaml.MetaMLP([1, 4, 1]).save(path.replace("ckpt", "pt"))
    code, out, err = run_cli(capsys, *TRAIN, "--checkpoint", "x.ckpt/")
    assert code == 1
    assert_one_line(err)
    assert "does not exist" not in err and "x.ckpt/ ends with '/'" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"),
                    reason="needs a Linux /proc, which takes no new files")
def test_a_directory_that_takes_no_new_files_is_not_said_to_be_missing(tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN, "--out", "/proc/run")
    assert code == 1
    assert_one_line(err)
    assert "does not exist" not in err
    assert "the directory /proc does not take new files" in err and "/proc/run.pt" in err
    with pytest.raises(OSError, match="the directory /proc does not take new files"):
        pymaml.MetaMLP([1, 4, 1]).save("/proc/m.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    daml = pymaml.train(algorithm="daml", iterations=5, checkpoint=d / "daml.ckpt", **QUIET)
    daml.model.save(d / "daml.pt")
    maml = pymaml.train(iterations=5, checkpoint=d / "maml.ckpt", **QUIET)
    maml.model.save(d / "maml.pt")
    return d


def test_resuming_another_algorithms_checkpoint_names_its_algorithm(runs, tmp_path,
                                                                    monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"checkpoint .*daml.ckpt holds a daml run, not a maml "
                                         r"one: resume it with algorithm='daml' "
                                         r"\(--algorithm daml\)"):
        pymaml.train(iterations=10, checkpoint=runs / "daml.ckpt", resume=True, **QUIET)
    with pytest.raises(ValueError, match="maml.ckpt holds a maml run, not a daml one"):
        pymaml.train(algorithm="daml", iterations=10, checkpoint=runs / "maml.ckpt",
                     resume=True, **QUIET)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN, "--checkpoint", str(runs / "daml.ckpt"),
                             "--resume", "--iterations", "10")
    assert code == 1
    assert_one_line(err)
    assert "saved model" not in err and "holds a daml run" in err


def test_resuming_a_saved_model_says_which_model_and_which_run_it_starts(runs):
    with pytest.raises(ValueError, match=r"daml.pt is a saved DAML model .*, not a training "
                                         r"checkpoint, so there is no run to resume: a maml run "
                                         r"cannot start from it either; pass it as init= with "
                                         r"algorithm='daml' \(--algorithm daml --init "):
        pymaml.train(iterations=10, checkpoint=runs / "daml.pt", resume=True, **QUIET)
    with pytest.raises(ValueError, match=r"maml.pt is a saved MAML model \(a MetaMLP\), not a "
                                         r"training checkpoint, so there is no run to resume: "
                                         r"pass it as init= \(--init\)"):
        pymaml.train(iterations=10, checkpoint=runs / "maml.pt", resume=True, **QUIET)
    with pytest.raises(ValueError, match="a daml run cannot start from it either; pass it as "
                                         "init= with algorithm='maml'"):
        pymaml.train(algorithm="daml", iterations=10, checkpoint=runs / "maml.pt",
                     resume=True, **QUIET)


@pytest.mark.parametrize("flag,value,words", [
    ("--outer-lr", "-1", "argument --outer-lr: must be a positive finite number, got -1"),
    ("--outer-lr", "0", "argument --outer-lr: must be a positive finite number, got 0"),
    ("--outer-lr", "nan", "argument --outer-lr: must be a positive finite number, got nan"),
    ("--inner-lr", "inf", "argument --inner-lr: must be a finite number, got inf"),
    ("--dist-timeout", "-5", "argument --dist-timeout: must be a positive finite number"),
])
def test_a_bad_rate_is_named_by_its_own_flag(tmp_path, monkeypatch, capsys, flag, value, words):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN, f"{flag}={value}")
    assert code == 2
    assert_one_line(err)
    assert words in err and "--optimizer-arg" not in err, err
    assert os.listdir(tmp_path) == []


def test_an_optimizer_refusing_the_rate_names_the_rate():
    from pymaml.config import check_optimizer_kwargs
    with pytest.raises(ValueError, match=r"^outer_lr -1.0: SGD refuses it: Invalid learning rate"):
        check_optimizer_kwargs(torch.optim.SGD, {}, -1.0, name="--optimizer-arg")


@pytest.mark.parametrize("device", ["xla", "mps", "hpu", "ipu", "xpu"])
def test_a_device_this_torch_build_lacks_is_said_in_one_line(tmp_path, monkeypatch, capsys,
                                                            device):
    try:
        torch.empty(0, device=device)
        pytest.skip(f"this torch build has {device}")
    except Exception:
        pass
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN, "--device", device)
    assert code == 1
    assert_one_line(err)
    assert (f"device '{device}' is not available in this torch build ({torch.__version__}) on "
            "this machine: use cpu") in err, err
    assert "aten::" not in err and "backend" not in err and len(err) < 200, err
    with pytest.raises(ValueError, match=f"device '{device}' is not available in this torch "
                                         "build"):
        pymaml.MetaMLP([1, 4, 1], device=device)


@pytest.mark.parametrize("argv", [["--meta-batch-size", str(10**12)], ["--shots", str(10**12)]])
def test_work_too_large_for_memory_is_said_in_pymamls_words(tmp_path, monkeypatch, capsys, argv):
    """Found by the s30-25p review: torch's "[enforce fail at alloc_cpu.cpp:127] err == 0.
    DefaultCPUAllocator: can't allocate memory" for a meta-batch or shots far too large."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *TRAIN, *argv)
    assert code == 1
    assert_one_line(err)
    assert "enforce fail" not in err and "alloc_cpu" not in err
    assert "error: out of memory (" in err and "GiB asked): lower --meta-batch-size" in err
