"""Files pymaml reads and writes: damaged files refused (digest, zip CRCs), checkpoints with a
missing field or an impossible value refused naming the field, files of the previous version
(no digest) still read, output paths checked before the first iteration, a full disk said in
words with the last checkpoint kept, and temporary files of killed writers cleaned up."""

import errno
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import pymaml
from pymaml import _io
from pymaml import tasks

from conftest import assert_one_line, run_cli

QUIET = dict(progress=False, log_every=0)
RUN = dict(iterations=30, meta_batch_size=2, optimizer="adam", outer_lr=1e-3, checkpoint_every=10,
           **QUIET)


def flipped(data: bytes, i: int) -> bytes:
    b = bytearray(data)
    b[i] ^= 0x01
    return bytes(b)


def counting_sampler():
    """A seed-sine sampler that counts its calls (how many iterations started)."""
    def sampler(T, generator):
        sampler.calls += 1
        return tasks.SeedSine().sample(T, generator=generator)
    sampler.calls = 0
    sampler.__name__ = "counted"
    return sampler


def temp_files(directory):
    return sorted(n for n in os.listdir(directory) if ".pymaml-tmp." in n or n.endswith(".tmp"))


# ---- 1. damaged files ----------------------------------------------------------------------

def test_every_single_byte_damage_of_a_model_file_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    pymaml.MetaMLP([1, 3, 1]).save(path)
    data = path.read_bytes()
    damaged = tmp_path / "damaged.pt"
    for i in range(len(data)):
        damaged.write_bytes(flipped(data, i))
        with pytest.raises(ValueError, match="damaged.pt (is damaged|is not a pymaml file)"):
            pymaml.load(damaged)


def test_cut_short_or_extended_files_are_refused(tmp_path):
    path = tmp_path / "m.pt"
    pymaml.MetaMLP([1, 3, 1]).save(path)
    data = path.read_bytes()
    damaged = tmp_path / "damaged.pt"
    variants = [data[:n] for n in range(1, len(data), 7)] + [data[:-1], data[:-78], data + b"\0",
                                                               data + data[-100:]]
    for variant in variants:
        damaged.write_bytes(variant)
        with pytest.raises(ValueError, match="damaged.pt"):
            pymaml.load(damaged)


def params_offset(path, params):
    """Where the weights' bytes start in a saved file."""
    offset = path.read_bytes().find(params.detach().cpu().numpy().tobytes())
    assert offset > 0
    return offset


def test_a_damaged_checkpoint_is_refused_before_any_work(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    first = pymaml.train(checkpoint=ckpt, **RUN)
    at = params_offset(ckpt, first.model.params) + 17
    ckpt.write_bytes(flipped(ckpt.read_bytes(), at))
    before = ckpt.read_bytes()
    sampler = counting_sampler()
    with pytest.raises(ValueError, match="run.ckpt is damaged"):
        pymaml.train(sampler, **{**RUN, "iterations": 40}, checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match="run.ckpt is damaged"):
        pymaml.load(ckpt)
    assert sampler.calls == 0 and ckpt.read_bytes() == before


def test_the_cli_refuses_a_damaged_model_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = pymaml.MetaMLP([1, 8, 1])
    model.save("m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(flipped(data, params_offset(tmp_path / "m.pt", model.params)))
    for command in ("eval", "plot"):
        code, out, err = run_cli(capsys, command, "m.pt", "--tasks", "2")
        assert code == 1
        assert_one_line(err)
        assert "m.pt is damaged" in err
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


# ---- files of the previous version (no digest): read, and checked by the zip's CRCs ----------

def unsealed(path):
    """The file as the previous version wrote it: torch.save of the same dict, no digest."""
    torch.save(torch.load(path, weights_only=True), path)
    assert _io._verify_seal(str(path)) is False


def test_files_of_the_previous_version_load_and_resume_bitwise(tmp_path):
    whole = pymaml.train(**{**RUN, "iterations": 40})
    ckpt, model_file = tmp_path / "run.ckpt", tmp_path / "m.pt"
    part = pymaml.train(checkpoint=ckpt, **RUN)
    part.model.save(model_file)
    unsealed(ckpt)
    unsealed(model_file)
    assert torch.equal(pymaml.load(model_file).params, part.model.params)
    assert torch.equal(pymaml.load(ckpt).params, part.model.params)
    resumed = pymaml.train(checkpoint=ckpt, resume=True, **{**RUN, "iterations": 40})
    assert torch.equal(resumed.model.params, whole.model.params)
    assert torch.equal(resumed.losses, whole.losses)
    assert _io._verify_seal(str(ckpt)) is True  # rewritten by this version: sealed


def test_damage_to_a_file_of_the_previous_version_fails_its_crc(tmp_path):
    path = tmp_path / "old.pt"
    model = pymaml.MetaMLP([1, 8, 1])
    model.save(path)
    unsealed(path)
    path.write_bytes(flipped(path.read_bytes(), params_offset(path, model.params) + 5))
    with pytest.raises(ValueError, match="old.pt is damaged: the archive member .*data/0 fails "
                                         "its CRC check"):
        pymaml.load(path)


# ---- 1. checkpoint fields --------------------------------------------------------------------

def _set(field, value):
    def change(d):
        *parents, last = field.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return change


def _delete(field):
    def change(d):
        *parents, last = field.split(".")
        for p in parents:
            d = d[p]
        del d[last]
    return change


def _optimizer_buffer(value, name="exp_avg"):
    def change(d):
        if value is None:
            del d["optimizer"]["state"][0][name]
        else:
            d["optimizer"]["state"][0][name] = value
    return change


def _group(key, value):
    """The optimizer's param group with `key` set to `value` (a copy: the fixture stays good)."""
    def change(d):
        d["optimizer"]["param_groups"] = [dict(d["optimizer"]["param_groups"][0], **{key: value})]
    return change


# (a change to a good checkpoint, the field the refusal must name)
BAD_FIELDS = [(_delete(f), f) for f in ("iteration", "losses", "model", "optimizer", "generator",
                                        "config", "format_version")] + [
    (_delete("config.dtype"), "config.dtype"),
    (_delete("model.params"), "params"),
    (_set("iteration", -1), "iteration"),
    (_set("iteration", 31), "iteration"),      # past the run's own iterations
    (_set("iteration", "20"), "iteration"),
    (_set("iteration", 20), "losses"),         # 30 losses for 20 iterations
    (_set("losses", torch.zeros(30)), "losses"),  # float32, not the float64 history
    (_set("losses", torch.full((30,), float("nan"), dtype=torch.float64)), "losses"),
    (_set("format_version", 99), "format_version"),
    (_set("config.iterations", -3), "config.iterations"),
    (_set("config.sizes", [1, 0, 1]), "config.sizes"),
    (_set("model.params", torch.zeros(5)), "model"),
    (_set("model.params", torch.full((1153,), float("inf"))), "model.params"),
    (_set("model.params", torch.zeros(1153, dtype=torch.float64)), "model.params"),
    (_set("model.activation", "gelu"), "model"),
    (_set("model.loss", "mse"), "model.loss"),     # not the run's own settings
    (_set("model.inner_steps", 2), "model.inner_steps"),
    (_set("generator", torch.zeros(7, dtype=torch.uint8)), "generator"),
    (_set("generator", [1, 2, 3]), "generator"),
    (_set("optimizer", {"state": {}}), "optimizer"),
    (_optimizer_buffer(torch.zeros(4)), "optimizer.state.exp_avg"),
    # the optimizer's settings and state against the run's (Adam, outer_lr 1e-3)
    (_group("maximize", True), "optimizer.param_groups[0].maximize"),
    (_group("lr", 1e6), "optimizer.param_groups[0].lr"),
    (_group("lr", "x"), "optimizer.param_groups[0].lr"),
    (_group("weight_decay", 5), "optimizer.param_groups[0].weight_decay"),
    (_group("betas", (0.5, 0.999)), "optimizer.param_groups[0].betas"),
    (_group("amsgrad", 1), "optimizer.param_groups[0].amsgrad"),
    (_optimizer_buffer(None, "exp_avg"), "optimizer.state.exp_avg"),
    (_optimizer_buffer(None, "step"), "optimizer.state.step"),
    (_optimizer_buffer(torch.tensor(3.0), "step"), "optimizer.state.step"),
    (_optimizer_buffer(torch.tensor(-1.0), "step"), "optimizer.state.step"),
    (_optimizer_buffer(torch.zeros(1153), "momentum_buffer"), "optimizer.state.momentum_buffer"),
    (_optimizer_buffer(torch.zeros(1153, dtype=torch.float64)), "optimizer.state.exp_avg"),
    (_set("optimizer.state", {}), "optimizer.state"),  # Adam's moments lost: not a fresh start
    # found by the s30-25p review: values no run writes, which resumed into a "diverged" run
    # blamed on training, or (non-contiguous) into a silently different one; and settings of
    # how the step runs that crashed it in torch's words
    (_optimizer_buffer(torch.full((1153,), float("nan"))), "optimizer.state.exp_avg"),
    (_optimizer_buffer(torch.full((1153,), float("inf"))), "optimizer.state.exp_avg"),
    (_optimizer_buffer(torch.full((1153,), -1.0), "exp_avg_sq"), "optimizer.state.exp_avg_sq"),
    (_optimizer_buffer(torch.full((1153,), float("nan")), "exp_avg_sq"),
     "optimizer.state.exp_avg_sq"),
    (_optimizer_buffer(torch.zeros(1153, 2)[:, 0]), "optimizer.state.exp_avg"),
    (_group("differentiable", True), "optimizer.param_groups[0].differentiable"),
    (_group("fused", "yes"), "optimizer.param_groups[0].fused"),
    (_set("config.outer_lr", -1.0), "config.outer_lr"),
    (_set("config.optimizer_kwargs", dict(betas=2)), "config.optimizer_kwargs"),
    (_set("config.processes", 2), "task_generators"),
]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "run.ckpt"
    pymaml.train(checkpoint=path, **RUN)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("change,field", BAD_FIELDS, ids=[f for _, f in BAD_FIELDS])
def test_a_checkpoint_missing_a_field_or_with_an_impossible_value_is_refused(
        good_checkpoint, tmp_path, change, field):
    d = dict(good_checkpoint)  # copies of what a change may touch: the fixture stays good
    d["config"], d["model"] = dict(d["config"]), dict(d["model"])
    d["optimizer"] = dict(d["optimizer"], state={0: dict(d["optimizer"]["state"][0])})
    change(d)
    ckpt = tmp_path / "bad.ckpt"
    _io.atomic_save(d, ckpt)  # sealed: the digest holds, the contents are what is wrong
    pattern = f"bad.ckpt.*{re.escape(field)}"
    sampler = counting_sampler()
    with pytest.raises(ValueError, match=pattern) as err:
        pymaml.train(sampler, **{**RUN, "iterations": 40}, checkpoint=ckpt, resume=True)
    assert "\n" not in str(err.value) and sampler.calls == 0
    with pytest.raises(ValueError, match=pattern):
        pymaml.load(ckpt)


def test_an_overflowed_second_moment_is_what_a_run_may_write(good_checkpoint, tmp_path):
    """Adam's exp_avg_sq of an overflowing gradient is +inf, and the weights stay finite: the
    value checks of the optimizer's buffers let it through."""
    d = dict(good_checkpoint)
    d["optimizer"] = dict(d["optimizer"], state={0: dict(d["optimizer"]["state"][0])})
    d["optimizer"]["state"][0]["exp_avg_sq"] = d["optimizer"]["state"][0]["exp_avg_sq"].clone()
    d["optimizer"]["state"][0]["exp_avg_sq"][:3] = float("inf")
    _io.atomic_save(d, tmp_path / "run.ckpt")
    resumed = pymaml.train(**{**RUN, "iterations": 32}, checkpoint=tmp_path / "run.ckpt",
                           resume=True)
    assert resumed.iterations == 32 and torch.isfinite(resumed.model.params).all()


def _resealed(path, change, name="bad.ckpt"):
    """A copy of checkpoint `path` changed by `change`, sealed again (its digest holds)."""
    d = torch.load(path, weights_only=True)
    change(d)
    bad = path.parent / name
    _io.atomic_save(d, bad)
    return bad


def test_a_meta_sgd_checkpoint_without_its_rates_or_their_state_is_refused(tmp_path):
    run = dict(RUN, algorithm="metasgd", task="sine", sizes=[1, 8, 1], loss="mse",
               inner_steps=1)
    pymaml.train(checkpoint=tmp_path / "run.ckpt", **run)
    for change, field in [(_delete("model.learned_lr"), "field 'learned_lr' of the model"),
                          (_set("model.learned_lr", None), "field 'learned_lr' of the model"),
                          (lambda d: d["optimizer"]["state"].pop(1), "'optimizer.state.rates'"),
                          (lambda d: d["optimizer"]["state"][1].pop("exp_avg_sq"),
                           "'optimizer.state.rates.exp_avg_sq'")]:
        bad = _resealed(tmp_path / "run.ckpt", change)
        sampler = counting_sampler()
        with pytest.raises(ValueError, match=f"bad.ckpt.*{re.escape(field)}") as err:
            pymaml.train(sampler, **{k: v for k, v in run.items() if k != "task"},
                         checkpoint=bad, resume=True)
        assert "\n" not in str(err.value) and sampler.calls == 0, field
        with pytest.raises(ValueError, match=re.escape(field)):
            pymaml.load(bad)


class MyAdam(torch.optim.Adam):
    """An optimizer class of the user's: pymaml can name it only through the resuming run."""


def test_an_optimizer_class_of_the_users_is_checked_against_the_resuming_run(tmp_path):
    run = dict(RUN, optimizer=MyAdam)
    pymaml.train(checkpoint=tmp_path / "run.ckpt", **run)
    for change, field in [(_group("maximize", True), "param_groups[0].maximize"),
                          (_optimizer_buffer(None, "exp_avg"), "optimizer.state.exp_avg")]:
        bad = _resealed(tmp_path / "run.ckpt", change)
        with pytest.raises(ValueError, match=f"bad.ckpt.*{re.escape(field)}"):
            pymaml.train(**{**run, "iterations": 40}, checkpoint=bad, resume=True)
    resumed = pymaml.train(**{**run, "iterations": 40}, checkpoint=tmp_path / "run.ckpt",
                           resume=True)
    assert resumed.iterations == 40


def test_a_setting_missing_from_the_optimizers_group_is_refused_at_resume(tmp_path):
    pymaml.train(checkpoint=tmp_path / "run.ckpt", **RUN)

    def no_betas(d):
        d["optimizer"]["param_groups"][0].pop("betas")
    bad = _resealed(tmp_path / "run.ckpt", no_betas)
    with pytest.raises(ValueError, match=r"bad.ckpt: field 'optimizer.param_groups\[0\].betas' "
                                         r"is missing"):
        pymaml.train(**{**RUN, "iterations": 40}, checkpoint=bad, resume=True)


@pytest.mark.parametrize("optimizer,kwargs", [
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=1e-4)),
    ("adam", dict(betas=[0.8, 0.99], amsgrad=True)),
    (torch.optim.AdamW, dict(weight_decay=0.1, betas=(0.85, 0.995))),
    (torch.optim.RMSprop, dict(momentum=0.5, centered=True)),
    (MyAdam, dict(maximize=False, eps=1e-6)),
])
def test_the_optimizer_checks_refuse_no_run_they_wrote(tmp_path, optimizer, kwargs):
    """A checkpoint any optimizer setting wrote resumes, bitwise as a run never stopped."""
    run = dict(RUN, optimizer=optimizer, optimizer_kwargs=kwargs, iterations=20)
    whole = pymaml.train(**run)
    pymaml.train(checkpoint=tmp_path / "run.ckpt", **dict(run, iterations=10))
    pymaml.load(tmp_path / "run.ckpt")
    resumed = pymaml.train(checkpoint=tmp_path / "run.ckpt", resume=True, **run)
    assert torch.equal(resumed.model.params, whole.model.params)
    assert torch.equal(resumed.losses, whole.losses)


def test_the_cli_refuses_tampered_optimizer_state_in_one_line(good_checkpoint, tmp_path,
                                                             monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    d = dict(good_checkpoint)
    d["optimizer"] = dict(d["optimizer"], state={0: {k: v for k, v in
                                                     d["optimizer"]["state"][0].items()
                                                     if k != "exp_avg"}})
    _io.atomic_save(d, tmp_path / "maml-sine.ckpt")
    code, out, err = run_cli(capsys, "train", "--iterations", "40", "--resume", "--no-plots",
                             "--no-progress", "--meta-batch-size", "2", "--optimizer", "adam",
                             "--outer-lr", "1e-3")
    assert code == 1
    assert_one_line(err)
    assert "internal error" not in err and "maml-sine.ckpt" in err
    assert "'optimizer.state.exp_avg' is missing" in err


def test_the_cli_refuses_a_bad_checkpoint_in_one_line(good_checkpoint, tmp_path, monkeypatch,
                                                      capsys):
    monkeypatch.chdir(tmp_path)
    d = dict(good_checkpoint, iteration=-4)
    _io.atomic_save(d, tmp_path / "maml-sine.ckpt")
    code, out, err = run_cli(capsys, "train", "--iterations", "40", "--resume", "--no-plots",
                             "--no-progress")
    assert code == 1
    assert_one_line(err)
    assert "maml-sine.ckpt" in err and "'iteration' is -4" in err


# ---- 3. outputs checked before the work ---------------------------------------------------------

def test_a_checkpoint_path_that_is_a_directory_is_refused_before_training(tmp_path):
    (tmp_path / "run.ckpt").mkdir()
    sampler = counting_sampler()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="checkpoint .*run.ckpt is a directory"):
            pymaml.train(sampler, **RUN, checkpoint=tmp_path / "run.ckpt", overwrite=overwrite)
    assert sampler.calls == 0


def refuse_writes_in(monkeypatch, directory, code):
    """os.open fails with `code` for new files in `directory` (a read-only filesystem, a
    directory without write permission: root passes real permission checks)."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if os.path.dirname(os.path.abspath(path)) == str(directory) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), path)
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(_io.os, "open", fake_open)


@pytest.mark.parametrize("code,words", [(errno.EROFS, "is on a read-only filesystem"),
                                        (errno.EACCES, "is not writable"),
                                        (errno.ENOSPC, "no space left on")])
def test_an_unwritable_checkpoint_directory_is_refused_before_training(tmp_path, monkeypatch,
                                                                       code, words):
    out = tmp_path / "out"
    out.mkdir()
    refuse_writes_in(monkeypatch, out, code)
    sampler = counting_sampler()
    with pytest.raises(OSError, match=words) as err:
        pymaml.train(sampler, **RUN, checkpoint=out / "run.ckpt")
    assert str(out) in str(err.value) and "[Errno" not in str(err.value)
    assert sampler.calls == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_refused_before_training(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(OSError, match="not writable"):
            pymaml.train(**RUN, checkpoint=out / "run.ckpt")
    finally:
        out.chmod(0o755)


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    real = os.statvfs

    def nearly_full(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 1, 1) + tuple(st)[5:])
    monkeypatch.setattr(_io.os, "statvfs", nearly_full)
    sampler = counting_sampler()
    with pytest.raises(OSError, match=f"no space left on {tmp_path}: the checkpoint .*run.ckpt "
                                      "will need about"):
        pymaml.train(sampler, **RUN, checkpoint=tmp_path / "run.ckpt")
    assert sampler.calls == 0


def test_a_full_disk_during_a_run_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "run.ckpt"
    real_save, calls = torch.save, []

    def fills_the_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"x" * 100)  # part of the file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(_io.torch, "save", fills_the_disk)
    with pytest.raises(OSError, match=f"no space left on {tmp_path} .*at iteration 20; the last "
                                      "checkpoint, .*run.ckpt, is kept \\(at iteration 10\\)"):
        pymaml.train(**RUN, checkpoint=ckpt)
    monkeypatch.undo()
    assert temp_files(tmp_path) == []
    assert torch.load(ckpt, weights_only=True)["iteration"] == 10
    resumed = pymaml.train(**RUN, checkpoint=ckpt, resume=True)
    assert torch.equal(resumed.model.params, pymaml.train(**RUN).model.params)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_torch_save_meets_a_full_disk_as_enospc():
    # Through pymaml's writer a full disk is an OSError(ENOSPC), which _io words, not
    # torch's "enforce fail at inline_container.cc".
    fd = os.open("/dev/full", os.O_RDWR)
    try:
        with pytest.raises(OSError) as err:
            torch.save({"w": torch.zeros(10_000)}, _io._SealingWriter(fd))
    finally:
        os.close(fd)
    assert err.value.errno == errno.ENOSPC


@pytest.mark.parametrize("blocked", ["big.pt", "big.png", "big-loss.png"])
def test_the_cli_checks_its_outputs_before_training(tmp_path, monkeypatch, capsys, blocked):
    monkeypatch.chdir(tmp_path)
    (tmp_path / blocked).mkdir()
    began = time.perf_counter()
    code, out, err = run_cli(capsys, "train", "--out", "big", "--iterations", "100000000",
                             "--no-progress")
    assert time.perf_counter() - began < 60  # 10**8 iterations would take hours
    assert code == 1
    assert_one_line(err)
    assert f"{blocked} is a directory" in err
    assert sorted(os.listdir(tmp_path)) == [blocked]


def test_the_cli_refuses_an_output_directory_that_does_not_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", "--out", "nowhere/run", "--iterations", "100000000")
    assert code == 1
    assert_one_line(err)
    assert "nowhere does not exist" in err
    pymaml.MetaMLP([1, 8, 1]).save("m.pt")
    code, out, err = run_cli(capsys, "plot", "m.pt", "--out", "nowhere/f.png")
    assert code == 1 and "nowhere does not exist" in err


# ---- 4. temporary files left by killed writers ----------------------------------------------------

KILLED_WRITER = """
import sys, time, torch, pymaml
from pymaml import _io
real = torch.save
def slow_save(obj, f, *args, **kwargs):
    f.write(b"x" * 4096)  # part of a checkpoint
    print("writing", flush=True)
    time.sleep(600)
_io.torch.save = slow_save
pymaml.train(iterations=3, checkpoint=sys.argv[1], progress=False, log_every=0)
"""


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_kill_during_a_checkpoint_write_leaves_litter_the_next_run_removes(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    root = os.path.dirname(os.path.dirname(os.path.abspath(pymaml.__file__)))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(ckpt)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=root))
    try:
        assert proc.stdout.readline() == "writing\n"
        left = temp_files(tmp_path)
        assert len(left) == 1 and left[0].startswith("run.ckpt.pymaml-tmp.")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert temp_files(tmp_path) == left  # kill -9: nothing cleaned up
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        # Not litter: a live process's write, another host's, another file's.
        keep = [f"run.ckpt.pymaml-tmp.{_io._HOST}.{sleeper.pid}.0123abcd.tmp",
                f"run.ckpt.pymaml-tmp.otherhost.{dead_pid()}.0123abcd.tmp",
                f"other.ckpt.pymaml-tmp.{_io._HOST}.{dead_pid()}.0123abcd.tmp"]
        # Litter of this version and of the previous one (PATH.PID.HEX.tmp).
        litter = [f"run.ckpt.pymaml-tmp.{_io._HOST}.{dead_pid()}.89abcdef.tmp",
                  f"run.ckpt.{dead_pid()}.89abcdef.tmp"]
        for name in keep + litter:
            (tmp_path / name).write_bytes(b"x" * 100)
        pymaml.train(iterations=3, checkpoint=ckpt, overwrite=True, **QUIET)
        assert temp_files(tmp_path) == sorted(keep)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_saving_a_model_removes_the_litter_of_its_earlier_saves(tmp_path):
    name = f"m.pt.pymaml-tmp.{_io._HOST}.{dead_pid()}.0123abcd.tmp"
    (tmp_path / name).write_bytes(b"x")
    pymaml.MetaMLP([1, 4, 1]).save(tmp_path / "m.pt")
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_the_cli_keeps_the_run_when_the_model_cannot_be_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def full_disk(self, path, **kw):
        raise _io.io_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), os.fspath(path),
                           "writing")
    real_save = pymaml.MetaMLP.save
    monkeypatch.setattr(pymaml.MetaMLP, "save", full_disk)
    argv = ["train", "--iterations", "30", "--no-plots", "--no-progress"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 1
    assert_one_line(err)
    assert f"no space left on {tmp_path} (writing maml-sine.pt)" in err
    assert "the trained weights are in the checkpoint maml-sine.ckpt" in err and "--resume" in err
    assert "[Errno" not in err
    monkeypatch.setattr(pymaml.MetaMLP, "save", real_save)
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert torch.equal(pymaml.load("maml-sine.pt").params, pymaml.load("maml-sine.ckpt").params)


def test_resuming_a_checkpoint_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*none.ckpt: no such file, so there "
                                                "is no run to resume"):
        pymaml.train(**RUN, checkpoint=tmp_path / "none.ckpt", resume=True)
    with pytest.raises(OSError, match="a part of .*m.pt is a file, not a directory"):
        (tmp_path / "m.pt").write_bytes(b"")
        pymaml.train(**RUN, checkpoint=tmp_path / "m.pt" / "run.ckpt")


def test_what_a_run_may_write_is_not_refused(good_checkpoint, tmp_path):
    # Adam's second moment of an overflowing gradient is infinite while the weights stay finite.
    d = dict(good_checkpoint)
    d["optimizer"] = dict(d["optimizer"], state={0: dict(d["optimizer"]["state"][0])})
    d["optimizer"]["state"][0]["exp_avg_sq"] = d["optimizer"]["state"][0]["exp_avg_sq"].clone()
    d["optimizer"]["state"][0]["exp_avg_sq"][0] = float("inf")
    _io.atomic_save(d, tmp_path / "run.ckpt")
    run = pymaml.train(**{**RUN, "iterations": 31}, checkpoint=tmp_path / "run.ckpt", resume=True)
    assert run.iterations == 31
