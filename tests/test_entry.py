"""Ctrl-C around the command line's commands (pymaml._entry): while torch and pymaml load, and
while the process exits, `python -m pymaml` prints one line, never a traceback; a program that
imports pymaml as a library keeps Python's own report."""

import os
import signal
import subprocess
import sys
import time

import pytest

import pymaml
from pymaml import _entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pymaml.__file__)))

# Put first on the path of a child process: a Ctrl-C (KeyboardInterrupt) where a real one
# would land, deterministically: while `torch` is imported, or in an atexit callback.
SITECUSTOMIZE = '''
import atexit, os, sys
where = os.environ.get("FAKE_CTRL_C")
if where == "import":
    class Interrupt:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                raise KeyboardInterrupt
            return None
    sys.meta_path.insert(0, Interrupt())
elif where == "exit":
    def interrupt():
        raise KeyboardInterrupt
    atexit.register(interrupt)  # registered first: runs last, after pymaml's own
'''


def child(tmp_path, argv, where):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, FAKE_CTRL_C=where,
               PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    return subprocess.run([sys.executable] + argv, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("where", ["import", "exit"])
def test_ctrl_c_while_loading_or_exiting_says_one_line(tmp_path, where):
    p = child(tmp_path, ["-m", "pymaml", "info"], where)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stderr == "pymaml: interrupted\n", p.stderr
    if where == "import":
        assert p.returncode in (130, -signal.SIGINT), p.returncode  # killed by SIGINT
    else:
        assert "fused op compiled" in p.stdout  # the command ran; the exit was interrupted


def test_a_program_importing_pymaml_keeps_pythons_report(tmp_path):
    p = child(tmp_path, ["-c", "import pymaml"], "import")
    assert "Traceback" in p.stderr and "KeyboardInterrupt" in p.stderr


def test_a_real_ctrl_c_at_any_moment_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    for delay in (0.05, 0.3, 0.6, 1.0, 1.5):
        p = subprocess.Popen([sys.executable, "-m", "pymaml", "info"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        if "<frozen site>" in err and "pymaml" not in err:
            continue  # the interpreter's own start (site, .pth files), before any of pymaml
        assert "Traceback" not in err, (delay, err)
        assert err in ("", "pymaml: interrupted\n", "pymaml info: interrupted\n"), (delay, err)


@pytest.mark.parametrize("argv,expected", [
    (["python", "-m", "pymaml", "train"], True),
    (["python", "-P", "-u", "-m", "pymaml", "info"], True),
    (["python", "-mpymaml"], True),
    (["python", "-m", "pymaml.cli"], True),
    (["python", "-m", "pytest", "tests"], False),
    (["python", "-m", "pymamlx"], False),
    (["python", "script.py"], False),
])
def test_the_command_line_is_recognised(monkeypatch, argv, expected):
    monkeypatch.setattr(sys, "orig_argv", argv)
    monkeypatch.setattr(sys, "argv", argv[1:] or [""])
    assert _entry.is_command_line() is expected
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", "/usr/local/bin/pymaml", "info"])
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/pymaml", "info"])
    assert _entry.is_command_line()
